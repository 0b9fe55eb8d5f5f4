// Headless-Chromium check of the pack in a running ComfyUI (see test_browser.py):
// loads the page (classic canvas, and again with Vue-rendered nodes), records the console,
// loads every workflow (round trip: serialize() must give back the same nodes, widget values
// and links; graphToPrompt() gives the API prompt the frontend would queue), takes
// screenshots, and optionally queues a "showcase" graph so the nodes show their outputs.
//   node check_ui.mjs --url URL --out DIR [--workflows a.json b.json] [--showcase spec.json] [--vue]
// Writes DIR/result.json and PNGs into DIR.
import { readFileSync, writeFileSync } from "node:fs";
import { basename, join } from "node:path";

import { buildInPage } from "./make_workflows.mjs";
import { PACK_NAME, launch, openComfy, ourProblems } from "./browser_lib.mjs";

function args() {
  const a = { url: "http://127.0.0.1:8199", out: ".", workflows: [], showcase: null, vue: false };
  const v = process.argv.slice(2);
  for (let i = 0; i < v.length; i++) {
    if (v[i] === "--url") a.url = v[++i];
    else if (v[i] === "--out") a.out = v[++i];
    else if (v[i] === "--showcase") a.showcase = v[++i];
    else if (v[i] === "--vue") a.vue = true;
    else if (v[i] === "--workflows") while (v[i + 1] && !v[i + 1].startsWith("--")) a.workflows.push(v[++i]);
  }
  return a;
}

function summary(wf) {
  return {
    nodes: wf.nodes
      .map((n) => ({ id: n.id, type: n.type, widgets_values: n.widgets_values ?? [], mode: n.mode ?? 0 }))
      .sort((x, y) => x.id - y.id),
    links: (wf.links ?? []).map((l) => (Array.isArray(l) ? l.slice(0, 6) : [l.id, l.origin_id, l.origin_slot, l.target_id, l.target_slot, l.type])),
  };
}

// Our nodes and the samplers must come back exactly. A newer ComfyUI may append widgets to other core
// nodes, left at their defaults (0.33: CreateVideo's bit_depth, SaveVideo's extra option): the saved
// values must then be the first of the loaded ones.
const EXACT_TYPES = /^(DPCache|KSampler)/;

function sameGraph(saved, loaded) {
  if (JSON.stringify(saved.links) !== JSON.stringify(loaded.links)) return false;
  if (saved.nodes.length !== loaded.nodes.length) return false;
  return saved.nodes.every((n, i) => {
    const m = loaded.nodes[i];
    if (n.id !== m.id || n.type !== m.type || n.mode !== m.mode) return false;
    const want = JSON.stringify(n.widgets_values);
    if (want === JSON.stringify(m.widgets_values)) return true;
    return !EXACT_TYPES.test(n.type) && want === JSON.stringify(m.widgets_values.slice(0, n.widgets_values.length));
  });
}

async function loadWorkflow(page, wf, name) {
  await page.evaluate(async ([w, name]) => {
    const app = window.comfyAPI.app.app;
    await app.loadGraphData(structuredClone(w), true, true, name);
  }, [wf, name]);
  await page.waitForTimeout(800);
}

/** Screenshot of the part of the canvas that holds the given node types (page coordinates). */
async function shootNodes(page, types, path, pad = 16) {
  const rect = await page.evaluate(
    ([types, pad]) => {
      const app = window.comfyAPI.app.app;
      const ds = app.canvas.ds;
      const box = app.canvas.canvas.getBoundingClientRect();
      let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
      const title = window.LiteGraph.NODE_TITLE_HEIGHT ?? 30;
      for (const n of app.graph.nodes) {
        if (!types.includes(n.type)) continue;
        x0 = Math.min(x0, n.pos[0]);
        y0 = Math.min(y0, n.pos[1] - title);
        x1 = Math.max(x1, n.pos[0] + n.size[0]);
        y1 = Math.max(y1, n.pos[1] + n.size[1]);
      }
      if (!Number.isFinite(x0)) return null;
      const s = ds.scale;
      const X = box.left + (x0 + ds.offset[0]) * s - pad;
      const Y = box.top + (y0 + ds.offset[1]) * s - pad;
      return { x: Math.max(0, X), y: Math.max(0, Y), width: (x1 - x0) * s + 2 * pad, height: (y1 - y0) * s + 2 * pad };
    },
    [types, pad],
  );
  if (rect) await page.screenshot({ path, clip: rect });
  return rect;
}

async function setView(page, scale, offset) {
  await page.evaluate(
    ([scale, offset]) => {
      const app = window.comfyAPI.app.app;
      app.canvas.ds.scale = scale;
      app.canvas.ds.offset = offset;
      app.canvas.setDirty(true, true);
    },
    [scale, offset],
  );
  await page.waitForTimeout(400);
}

async function runShowcase(page, spec, out, result) {
  await page.evaluate(buildInPage, spec);
  await setView(page, spec.view?.scale ?? 1, spec.view?.offset ?? [20, 60]);
  // queue through the frontend, so the nodes receive their "executed" outputs as in real use
  const t0 = Date.now();
  await page.evaluate(() => {
    const app = window.comfyAPI.app.app;
    window.__dpcacheDone = false;
    const api = window.comfyAPI.api.api;
    const done = () => (window.__dpcacheDone = true);
    api.addEventListener("execution_success", done);
    api.addEventListener("execution_error", (e) => ((window.__dpcacheError = e.detail), done()));
    return app.queuePrompt(0, 1);
  });
  await page.waitForFunction(() => window.__dpcacheDone === true, null, { timeout: 600000 });
  result.showcase = {
    seconds: (Date.now() - t0) / 1000,
    error: await page.evaluate(() => window.__dpcacheError ?? null),
    timeline: await page.evaluate(() =>
      window.comfyAPI.app.app.graph.nodes
        .filter((n) => n.__dpcache?.info)
        .map((n) => ({ type: n.type, keySteps: n.__dpcache.info.keySteps, numEvals: n.__dpcache.info.numEvals })),
    ),
  };
  await page.waitForTimeout(1500); // image previews load
  for (const [name, types] of Object.entries(spec.shots ?? {})) {
    const p = join(out, name);
    if (await shootNodes(page, types, p)) result.screenshots.push(p);
  }
}

async function main() {
  const a = args();
  const result = { vue: a.vue, extensionLoaded: false, workflows: {}, screenshots: [], log: [], ours: [] };
  const context = await launch();
  try {
    const { page, log } = await openComfy(context, a.url, { vueNodes: a.vue });
    result.extensionLoaded = await page.evaluate(() =>
      (window.comfyAPI.app.app.extensions ?? []).some((e) => e.name === "dpcache.ui"),
    );
    result.vueNodesEnabled = await page.evaluate(() => !!window.LiteGraph?.vueNodesMode);
    // help pages for the frontend's node help panel (web/docs/<NodeId>.md)
    result.help = await page.evaluate(async (pack) => {
      const out = {};
      for (const id of ["DPCacheCalibrate", "DPCacheSchedule", "DPCacheApply"]) {
        const r = await fetch(`/extensions/${pack}/docs/${id}.md`);
        out[id] = r.status;
      }
      return out;
    }, PACK_NAME);
    const tag = a.vue ? "vue" : "classic";
    for (const file of a.workflows) {
      const wf = JSON.parse(readFileSync(file, "utf8"));
      const name = basename(file, ".json");
      await loadWorkflow(page, wf, name);
      const back = await page.evaluate(() => window.comfyAPI.app.app.graph.serialize());
      const prompt = await page.evaluate(async () => (await window.comfyAPI.app.app.graphToPrompt()).output);
      const same = sameGraph(summary(wf), summary(back));
      result.workflows[name] = { roundtrip_ok: same, prompt };
      if (!same) result.workflows[name].roundtrip = { saved: summary(wf), loaded: summary(back) };
      const shot = join(out(a), `${tag}_${name}.png`);
      await page.screenshot({ path: shot });
      result.screenshots.push(shot);
    }
    if (a.showcase) await runShowcase(page, JSON.parse(readFileSync(a.showcase, "utf8")), a.out, result);
    await page.waitForTimeout(500);
    result.log = log;
    result.ours = ourProblems(log);
  } finally {
    await context.close();
    writeFileSync(join(a.out, "result.json"), JSON.stringify(result, null, 1));
  }
}

function out(a) {
  return a.out;
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
