// The README's picture of the three nodes: DPCache Calibrate, DPCache Schedule and Apply DPCache
// as ComfyUI's frontend draws them with their default inputs (Schedule's output wired to Apply).
// Run through screenshot_nodes.py, which starts the server:
//   node shoot_nodes.mjs --url URL --out docs/nodes.png
import { launch, openComfy } from "./browser_lib.mjs";

function args() {
  const a = { url: "http://127.0.0.1:8199", out: "nodes.png" };
  const v = process.argv.slice(2);
  for (let i = 0; i < v.length; i++) {
    if (v[i] === "--url") a.url = v[++i];
    else if (v[i] === "--out") a.out = v[++i];
  }
  return a;
}

/** Add the three nodes with their defaults, laid out side by side at their own (unclipped) size; returns the box to shoot. */
function placeNodes() {
  const app = window.comfyAPI.app.app;
  const LG = window.LiteGraph;
  app.graph.clear();
  const width = 340;
  const add = (type, pos) => {
    const n = LG.createNode(type);
    n.pos = pos;
    app.graph.add(n);
    const need = n.computeSize();
    n.setSize([Math.max(width, need[0]), need[1]]);
    return n;
  };
  const cal = add("DPCacheCalibrate", [20, 70]);
  const sched = add("DPCacheSchedule", [20 + width + 40, 70]);
  const apply = add("DPCacheApply", [20 + 2 * (width + 40), 70]);
  sched.connect(0, apply, 1);
  app.canvas.ds.scale = 1;
  app.canvas.ds.offset = [0, 0];
  app.canvas.setDirty(true, true);
  const title = LG.NODE_TITLE_HEIGHT ?? 30;
  const nodes = [cal, sched, apply];
  const x0 = Math.min(...nodes.map((n) => n.pos[0]));
  const y0 = Math.min(...nodes.map((n) => n.pos[1] - title));
  const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0]));
  const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
  const box = app.canvas.canvas.getBoundingClientRect();
  const pad = 16, badge = 14; // the pack's badge sits above each title
  return { x: box.left + x0 - pad, y: box.top + y0 - pad - badge, width: x1 - x0 + 2 * pad, height: y1 - y0 + 2 * pad + badge };
}

async function main() {
  const a = args();
  const context = await launch();
  try {
    const { page } = await openComfy(context, a.url);
    const clip = await page.evaluate(placeNodes);
    await page.waitForTimeout(800);
    await page.screenshot({ path: a.out, clip });
    console.log(JSON.stringify({ out: a.out, clip }));
  } finally {
    await context.close();
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
