// DPCache frontend extension (optional sugar; the nodes work without it).
// After a DPCache Schedule or Apply DPCache node runs, it draws a compact timeline
// of key (computed) and predicted evaluations plus a one-line summary under the
// node's widgets; after every sampling run it redraws both nodes for the plan
// that ran (the "dpcache.run" event carries its keys and T). Canvas-only: in the Vue-rendered node mode the widget is skipped
// (options.canvasOnly) and the node's preview image and help page remain.
// Every frontend API is feature-checked; when one is missing the extension does nothing.
import {
  HELP,
  NODE_IDS,
  RUN_EVENT,
  clip,
  compressRanges,
  parseRunInfo,
  parseScheduleInfo,
  runLine,
  summaryLine,
  timelineCells,
} from "./dpcache_logic.js";

const WIDGET = "dpcache_timeline";
const OUR_NODES = new Set([NODE_IDS.schedule, NODE_IDS.apply]);
const COLORS = { key: "#f0a030", pred: "#4a5568", text: "#c8c8c8", dim: "#8a8a8a" };

async function getComfy() {
  const g = globalThis.comfyAPI;
  if (g?.app?.app) return { app: g.app.app, api: g.api?.api ?? null };
  try {
    const [{ app }, apiMod] = await Promise.all([
      import("../../scripts/app.js"),
      import("../../scripts/api.js").catch(() => ({})),
    ]);
    return app ? { app, api: apiMod.api ?? null } : null;
  } catch {
    return null;
  }
}

function drawTimeline(ctx, node, width, y) {
  const st = node.__dpcache;
  if (!st?.info || typeof ctx?.fillRect !== "function") return;
  const margin = 15;
  const w = Math.max(0, width - 2 * margin);
  ctx.save();
  try {
    for (const c of timelineCells(st.info, margin, w)) {
      ctx.fillStyle = c.key ? COLORS.key : COLORS.pred;
      ctx.fillRect(c.x, y + 4, Math.max(c.w - (c.key ? 0 : 0.5), 0.5), c.key ? 12 : 8);
    }
    ctx.font = "11px sans-serif";
    ctx.textBaseline = "top";
    ctx.fillStyle = COLORS.text;
    const chars = Math.max(8, Math.floor(w / 6));
    ctx.fillText(clip(summaryLine(st.info), chars), margin, y + 20);
    let yy = y + 34;
    if (st.run) {
      ctx.fillStyle = COLORS.dim;
      ctx.fillText(clip(runLine(st.run), chars), margin, yy);
      yy += 14;
    }
    ctx.fillStyle = COLORS.dim;
    ctx.fillText(clip("keys: " + compressRanges(st.info.keySteps), chars), margin, yy);
  } finally {
    ctx.restore();
  }
}

function widgetHeight(node) {
  const st = node.__dpcache;
  if (!st?.info) return 0;
  return 52 + (st.run ? 14 : 0);
}

function ensureWidget(node) {
  if (node.widgets?.some((w) => w?.name === WIDGET)) return true;
  if (typeof node.addCustomWidget !== "function") return false;
  node.addCustomWidget({
    name: WIDGET,
    type: WIDGET,
    value: "",
    serialize: false, // never part of widgets_values or the API prompt
    options: { serialize: false, canvasOnly: true },
    computeSize: (width) => [width, widgetHeight(node)],
    draw: (ctx, n, width, y) => drawTimeline(ctx, n, width, y),
  });
  return true;
}

function refresh(node) {
  try {
    if (!ensureWidget(node)) return;
    if (typeof node.computeSize === "function" && typeof node.setSize === "function") {
      const s = node.computeSize();
      node.setSize([Math.max(node.size[0], s[0]), Math.max(node.size[1], s[1])]);
    }
    node.setDirtyCanvas?.(true, true);
  } catch {
    // cosmetic only: never let a drawing problem reach the user's workflow
  }
}

function setInfo(node, info) {
  node.__dpcache = { info, run: null };
  refresh(node);
}

function setRun(node, run) {
  if (run.plan) node.__dpcache = { info: run.plan, run: null }; // redraw for the plan that ran
  if (!node.__dpcache?.info) return;
  node.__dpcache.run = run;
  refresh(node);
}

function findNode(app, id) {
  try {
    return app.graph?.getNodeById?.(id) ?? app.graph?.getNodeById?.(Number(id)) ?? null;
  } catch {
    return null;
  }
}

async function main() {
  const comfy = await getComfy();
  if (!comfy || typeof comfy.app.registerExtension !== "function") return;
  const { app, api } = comfy;
  app.registerExtension({
    name: "dpcache.ui",
    async beforeRegisterNodeDef(nodeType, nodeData) {
      const id = nodeData?.name;
      if (!(id in HELP) || !nodeType?.prototype) return;
      if (!nodeData.description) nodeData.description = HELP[id];
      if (!OUR_NODES.has(id)) return;
      const prev = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (output) {
        const r = prev?.apply(this, arguments);
        const info = parseScheduleInfo(output);
        if (info) setInfo(this, info);
        return r;
      };
    },
    async setup() {
      if (typeof api?.addEventListener !== "function") return;
      api.addEventListener(RUN_EVENT, (ev) => {
        const run = parseRunInfo(ev?.detail);
        if (!run) return;
        for (const id of run.nodes) {
          const node = findNode(app, id);
          if (OUR_NODES.has(node?.type)) setRun(node, run);
        }
      });
    },
  });
}

main().catch(() => {});
