// Run: node --test web/tests/
import { test } from "node:test";
import assert from "node:assert/strict";

import {
  HELP,
  NODE_IDS,
  UI_KEY,
  clip,
  compressRanges,
  formatSpeedup,
  parseRunInfo,
  parseScheduleInfo,
  runLine,
  sourceLabel,
  summaryLine,
  timelineCells,
  timelineRuns,
  timelineText,
} from "../dpcache_logic.js";

const OUT = {
  [UI_KEY]: [{ key_steps: [0, 1, 2, 5, 9], num_evals: 10, ideal_speedup: 2.0, source: "pact:flux_dev_euler_50" }],
};

test("parseScheduleInfo reads the node's ui output", () => {
  const info = parseScheduleInfo(OUT);
  assert.deepEqual(info.keySteps, [0, 1, 2, 5, 9]);
  assert.equal(info.numEvals, 10);
  assert.equal(info.idealSpeedup, 2.0);
  assert.equal(info.source, "pact:flux_dev_euler_50");
  assert.equal(info.cost, null);
});

test("parseScheduleInfo accepts a bare entry, sorts, dedups and fills the speed-up", () => {
  const info = parseScheduleInfo({ key_steps: [4, 0, "2", 4], num_evals: "8", cost: 0.5 });
  assert.deepEqual(info.keySteps, [0, 2, 4]);
  assert.equal(info.numEvals, 8);
  assert.ok(Math.abs(info.idealSpeedup - 8 / 3) < 1e-12);
  assert.equal(info.cost, 0.5);
  assert.equal(info.source, "");
});

test("parseScheduleInfo rejects malformed input quietly", () => {
  for (const bad of [
    null,
    undefined,
    42,
    "x",
    {},
    { images: [] },
    { [UI_KEY]: [] },
    { [UI_KEY]: [null] },
    { key_steps: [0, 1], num_evals: 0 },
    { key_steps: [0, 10], num_evals: 10 },
    { key_steps: [-1], num_evals: 10 },
    { key_steps: [1.5], num_evals: 10 },
    { key_steps: [], num_evals: 10 },
    { key_steps: "0,1", num_evals: 10 },
    { key_steps: [0], num_evals: 1e9 },
  ]) {
    assert.equal(parseScheduleInfo(bad), null, JSON.stringify(bad));
  }
});

test("parseScheduleInfo ignores a non-positive speed-up and recomputes T/K", () => {
  const info = parseScheduleInfo({ key_steps: [0, 5], num_evals: 10, ideal_speedup: -3 });
  assert.equal(info.idealSpeedup, 5);
});

test("parseRunInfo", () => {
  assert.deepEqual(parseRunInfo({ node: 7, computed: 13, skipped: 37, measured_speedup: 3.41, summary: "s" }), {
    node: "7",
    nodes: ["7"],
    computed: 13,
    skipped: 37,
    measuredSpeedup: 3.41,
    summary: "s",
    plan: null,
  });
  const run = parseRunInfo({ node: 4, nodes: ["4", "2"], computed: 5, skipped: 15, num_evals: 20,
    key_steps: [0, 1, 2, 9, 15], ideal_speedup: 4, source: "auto:auto_flux.safetensors" });
  assert.deepEqual(run.nodes, ["4", "2"]);
  assert.deepEqual(run.plan.keySteps, [0, 1, 2, 9, 15]);
  assert.equal(run.plan.numEvals, 20);
  assert.equal(run.plan.source, "auto:auto_flux.safetensors");
  assert.equal(sourceLabel(run.plan.source), "auto auto_flux");
  assert.equal(parseRunInfo({ node: 1, computed: 1, skipped: 0, key_steps: [5], num_evals: 2 }).plan, null);
  assert.equal(parseRunInfo({ node: "7", computed: 1, skipped: 2 }).measuredSpeedup, null);
  assert.equal(parseRunInfo({ computed: 1, skipped: 2 }), null);
  assert.equal(parseRunInfo({ node: "1", computed: -1, skipped: 2 }), null);
  assert.equal(parseRunInfo(null), null);
});

test("formatting helpers", () => {
  assert.equal(formatSpeedup(3.846), "3.85\u00d7");
  assert.equal(formatSpeedup(12.34), "12.3\u00d7");
  assert.equal(formatSpeedup(NaN), "?");
  assert.equal(sourceLabel("pact:wan"), "PACT wan");
  assert.equal(sourceLabel("uniform"), "uniform");
  assert.equal(sourceLabel(""), "");
  assert.equal(compressRanges([0, 1, 2, 4, 7, 8, 9]), "0-2, 4, 7-9");
  assert.equal(compressRanges([]), "");
  assert.equal(clip("abcdef", 4), "abc\u2026");
  assert.equal(clip("abc", 4), "abc");
  assert.equal(clip("abc", 0), "");
  // between words, never inside a number
  assert.equal(clip("keys: 0-2, 12, 16, 23, 26, 31, 34", 20), "keys: 0-2, 12, 16\u2026");
  assert.equal(clip("13/50 key \u00b7 ideal 3.85\u00d7 \u00b7 PACT showcase_flux", 27), "13/50 key \u00b7 ideal 3.85\u00d7\u2026");
});

test("summary and run lines", () => {
  const info = parseScheduleInfo(OUT);
  assert.equal(summaryLine(info), "5/10 key \u00b7 ideal 2.00\u00d7 \u00b7 PACT flux_dev_euler_50");
  assert.equal(summaryLine(null), "");
  assert.equal(runLine({ computed: 5, skipped: 5, measuredSpeedup: 1.8 }), "last run: 5 computed, 5 predicted \u00b7 1.80\u00d7");
  assert.equal(runLine({ computed: 5, skipped: 5, measuredSpeedup: null }), "last run: 5 computed, 5 predicted");
});

test("timeline runs, text and cells cover the trajectory exactly", () => {
  const info = parseScheduleInfo(OUT);
  assert.equal(timelineText(info), "KKK\u00b7\u00b7K\u00b7\u00b7\u00b7K");
  assert.deepEqual(timelineRuns(info), [
    { start: 0, length: 3, key: true },
    { start: 3, length: 2, key: false },
    { start: 5, length: 1, key: true },
    { start: 6, length: 3, key: false },
    { start: 9, length: 1, key: true },
  ]);
  const cells = timelineCells(info, 15, 200);
  assert.equal(cells.length, 10);
  assert.equal(cells[0].x, 15);
  assert.ok(Math.abs(cells[9].x + cells[9].w - 215) < 1e-9);
  assert.deepEqual(cells.filter((c) => c.key).map((c) => c.t), info.keySteps);
  assert.deepEqual(timelineCells(info, 0, 0), []);
  // 1000 evaluations in 100 px: key cells stay visible
  const dense = parseScheduleInfo({ key_steps: [0, 500, 999], num_evals: 1000 });
  assert.ok(timelineCells(dense, 0, 100).filter((c) => c.key).every((c) => c.w >= 1));
});

test("help text exists for every node", () => {
  for (const id of Object.values(NODE_IDS)) assert.ok(HELP[id] && HELP[id].length > 40, id);
});

test("a help page for every node in web/docs", async () => {
  const { existsSync } = await import("node:fs");
  for (const id of Object.values(NODE_IDS)) {
    assert.ok(existsSync(new URL(`../docs/${id}.md`, import.meta.url)), id);
  }
});
