// Pure logic for the DPCache frontend extension: no DOM, no ComfyUI imports,
// so it runs in Node's test runner as well as in the browser.
// ComfyUI loads every .js file in WEB_DIRECTORY; this one only exports functions.

export const NODE_IDS = Object.freeze({
  calibrate: "DPCacheCalibrate",
  schedule: "DPCacheSchedule",
  apply: "DPCacheApply",
});

// Key of the node's `ui` output: {"dpcache_schedule": [{key_steps, num_evals, ideal_speedup, source}]}
export const UI_KEY = "dpcache_schedule";
// Optional websocket event sent after each sampling run by Apply DPCache.
export const RUN_EVENT = "dpcache.run";

const MAX_EVALS = 100000;

export const HELP = Object.freeze({
  DPCacheCalibrate:
    "Records the model's cache-point feature at every evaluation while you sample at full compute. " +
    "Each finished run adds one sample to the named PACT under models/dpcache/; queue a few different " +
    "prompts (5-10 are plenty) with the sampler, scheduler and step count you will use later.",
  DPCacheSchedule:
    "Plans which evaluations are computed in full ('key steps'). With a PACT it solves the DPCache " +
    "dynamic program for the cheapest K key steps; '(uniform)' spaces them evenly, '(manual)' takes " +
    "your list. K=13 of 50 gives an ideal 3.85x speed-up. A run with another number of model evaluations " +
    "(steps, sampler) is re-planned for it when sampling starts; 'budget' says how K follows.",
  DPCacheApply:
    "Patches the model so that key steps run every block and the other evaluations skip them, " +
    "predicting the last block's output with a Taylor expansion. Never changes the input model.",
});

function toInt(v) {
  if (typeof v === "number" && Number.isInteger(v)) return v;
  if (typeof v === "string" && /^\s*-?\d+\s*$/.test(v)) return parseInt(v, 10);
  return null;
}

function pickFirst(v) {
  return Array.isArray(v) ? v[0] : v;
}

/**
 * Normalise the schedule info a node sent in its `ui` output.
 * Accepts the whole output object ({dpcache_schedule: [...]}) or the entry itself.
 * Returns {keySteps, numEvals, idealSpeedup, source, cost} or null when absent or malformed.
 */
export function parseScheduleInfo(output) {
  if (output == null || typeof output !== "object") return null;
  let entry = UI_KEY in output ? pickFirst(output[UI_KEY]) : pickFirst(output);
  if (entry == null || typeof entry !== "object") return null;
  const numEvals = toInt(entry.num_evals);
  if (numEvals == null || numEvals < 1 || numEvals > MAX_EVALS) return null;
  if (!Array.isArray(entry.key_steps)) return null;
  const keys = [];
  for (const k of entry.key_steps) {
    const i = toInt(k);
    if (i == null || i < 0 || i >= numEvals) return null;
    keys.push(i);
  }
  keys.sort((a, b) => a - b);
  const keySteps = keys.filter((k, i) => i === 0 || k !== keys[i - 1]);
  if (keySteps.length === 0) return null;
  let idealSpeedup = Number(entry.ideal_speedup);
  if (!Number.isFinite(idealSpeedup) || idealSpeedup <= 0) idealSpeedup = numEvals / keySteps.length;
  const cost = Number(entry.cost);
  return {
    keySteps,
    numEvals,
    idealSpeedup,
    source: typeof entry.source === "string" ? entry.source : "",
    cost: entry.cost != null && Number.isFinite(cost) ? cost : null,
  };
}

/**
 * Normalise a RUN_EVENT detail: {node, nodes?, computed, skipped, num_evals?, key_steps?, ideal_speedup?,
 * source?, measured_speedup?, summary?}. `nodes`: every node to update (Apply DPCache and the Schedule that
 * fed it); `plan`: the plan that ran ({keySteps, numEvals, ...} as parseScheduleInfo) or null.
 */
export function parseRunInfo(detail) {
  if (detail == null || typeof detail !== "object") return null;
  if (detail.node == null) return null;
  const computed = toInt(detail.computed);
  const skipped = toInt(detail.skipped);
  if (computed == null || skipped == null || computed < 0 || skipped < 0) return null;
  const sp = Number(detail.measured_speedup);
  const node = String(detail.node);
  const nodes = Array.isArray(detail.nodes) ? detail.nodes.filter((n) => n != null).map(String) : [];
  if (!nodes.includes(node)) nodes.unshift(node);
  return {
    node,
    nodes,
    computed,
    skipped,
    measuredSpeedup: detail.measured_speedup != null && Number.isFinite(sp) && sp > 0 ? sp : null,
    summary: typeof detail.summary === "string" ? detail.summary : "",
    plan: "key_steps" in detail ? parseScheduleInfo(detail) : null,
  };
}

export function formatSpeedup(x) {
  if (!Number.isFinite(x) || x <= 0) return "?";
  return (x >= 10 ? x.toFixed(1) : x.toFixed(2)) + "\u00d7";
}

/** "uniform", "manual", "pact:flux_dev_euler_50" -> short human label. */
export function sourceLabel(source) {
  if (!source) return "";
  if (source.startsWith("pact:")) return "PACT " + source.slice(5);
  if (source.startsWith("auto:")) return "auto " + source.slice(5).replace(/\.safetensors$/, "");
  return source;
}

/** [0,1,2,4,7,8,9] -> "0-2, 4, 7-9" */
export function compressRanges(steps) {
  const out = [];
  let i = 0;
  while (i < steps.length) {
    let j = i;
    while (j + 1 < steps.length && steps[j + 1] === steps[j] + 1) j++;
    out.push(j > i ? `${steps[i]}-${steps[j]}` : `${steps[i]}`);
    i = j + 1;
  }
  return out.join(", ");
}

/** Shorten text to at most maxChars, with an ellipsis; cut between words (never inside a number)
 * when a space lies in the second half of the kept part. */
export function clip(text, maxChars) {
  if (maxChars < 1) return "";
  if (text.length <= maxChars) return text;
  let kept = text.slice(0, Math.max(0, maxChars - 1));
  const space = kept.lastIndexOf(" ");
  if (space > kept.length / 2) kept = kept.slice(0, space).replace(/[\s,;:\u00b7]+$/, "");
  return kept + "\u2026";
}

/** One-line summary, e.g. "13/50 key · ideal 3.85× · PACT flux_dev_euler_50". */
export function summaryLine(info) {
  if (!info) return "";
  const parts = [`${info.keySteps.length}/${info.numEvals} key`, `ideal ${formatSpeedup(info.idealSpeedup)}`];
  const src = sourceLabel(info.source);
  if (src) parts.push(src);
  return parts.join(" \u00b7 ");
}

/** Run summary, e.g. "last run: 13 computed, 37 predicted · 3.41×". */
export function runLine(run) {
  if (!run) return "";
  let s = `last run: ${run.computed} computed, ${run.skipped} predicted`;
  if (run.measuredSpeedup != null) s += ` \u00b7 ${formatSpeedup(run.measuredSpeedup)}`;
  return s;
}

/** Runs of equal kind along the trajectory: [{start, length, key}]. */
export function timelineRuns(info) {
  if (!info) return [];
  const isKey = new Uint8Array(info.numEvals);
  for (const k of info.keySteps) isKey[k] = 1;
  const runs = [];
  for (let t = 0; t < info.numEvals; t++) {
    const key = isKey[t] === 1;
    const last = runs[runs.length - 1];
    if (last && last.key === key) last.length++;
    else runs.push({ start: t, length: 1, key });
  }
  return runs;
}

/**
 * Geometry of the timeline strip: one cell per evaluation in `width` pixels.
 * Returns [{x, w, key, t}] with integer-ish x so that cells never overlap and
 * the strip spans exactly [x0, x0 + width]. Key cells are at least 1px wide.
 */
export function timelineCells(info, x0, width) {
  if (!info || !(width > 0)) return [];
  const T = info.numEvals;
  const isKey = new Uint8Array(T);
  for (const k of info.keySteps) isKey[k] = 1;
  const cells = [];
  for (let t = 0; t < T; t++) {
    const a = x0 + (t * width) / T;
    const b = x0 + ((t + 1) * width) / T;
    cells.push({ t, x: a, w: Math.max(b - a, isKey[t] ? 1 : 0), key: isKey[t] === 1 });
  }
  return cells;
}

/** Text for a plain-text timeline (used as a tooltip and in tests): K for key, · for predicted. */
export function timelineText(info) {
  if (!info) return "";
  const isKey = new Uint8Array(info.numEvals);
  for (const k of info.keySteps) isKey[k] = 1;
  let s = "";
  for (let t = 0; t < info.numEvals; t++) s += isKey[t] ? "K" : "\u00b7";
  return s;
}
