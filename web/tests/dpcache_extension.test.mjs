// The extension against a fake frontend: registration, onExecuted, drawing, serialization,
// and quiet degradation when frontend APIs are missing. Run: node --test web/tests/
import { test } from "node:test";
import assert from "node:assert/strict";

let n = 0;
async function load() {
  // a fresh module instance each time (the query string defeats the module cache)
  await import(`../dpcache.js?case=${++n}`);
  await new Promise((r) => setTimeout(r, 10));
}

function fakeFrontend() {
  const ext = [];
  const listeners = {};
  const nodes = new Map();
  const app = { registerExtension: (e) => ext.push(e), graph: { getNodeById: (id) => nodes.get(Number(id)) ?? null } };
  const api = { addEventListener: (name, cb) => ((listeners[name] ||= []).push(cb)) };
  return { ext, listeners, nodes, app, api };
}

class FakeNode {
  constructor(type) {
    this.type = type;
    this.size = [300, 120];
    this.widgets = [{ name: "key_steps", value: 13 }];
    this.dirty = 0;
  }
  addCustomWidget(w) {
    const c = { ...w }; // the frontend wraps the plain object
    this.widgets.push(c);
    return c;
  }
  computeSize() {
    return [200, 100 + this.widgets.reduce((h, w) => h + (w.computeSize ? w.computeSize(300)[1] : 20), 0)];
  }
  setSize(s) {
    this.size = s;
  }
  setDirtyCanvas() {
    this.dirty++;
  }
}

function fakeCtx() {
  const calls = { rects: 0, texts: [] };
  return {
    calls,
    save() {},
    restore() {},
    fillRect() {
      calls.rects++;
    },
    fillText(t) {
      calls.texts.push(t);
    },
  };
}

const UI = { dpcache_schedule: [{ key_steps: [0, 1, 2, 6], num_evals: 12, ideal_speedup: 3, source: "uniform" }] };

test("registers, wraps onExecuted, draws a non-serialized canvas-only widget", async () => {
  const f = fakeFrontend();
  globalThis.comfyAPI = { app: { app: f.app }, api: { api: f.api } };
  await load();
  assert.equal(f.ext.length, 1);
  const e = f.ext[0];
  assert.equal(e.name, "dpcache.ui");

  class Sched {}
  let prevCalled = 0;
  Sched.prototype.onExecuted = () => prevCalled++;
  const def = { name: "DPCacheSchedule", description: "" };
  await e.beforeRegisterNodeDef(Sched, def);
  assert.ok(def.description.length > 0, "help text filled when the node has none");
  const kept = { name: "DPCacheApply", description: "from python" };
  class Apply {}
  await e.beforeRegisterNodeDef(Apply, kept);
  assert.equal(kept.description, "from python");
  class Other {}
  await e.beforeRegisterNodeDef(Other, { name: "KSampler" });
  assert.equal(Other.prototype.onExecuted, undefined);

  const node = Object.assign(new FakeNode("DPCacheSchedule"), { onExecuted: Sched.prototype.onExecuted });
  node.onExecuted({ images: [] }); // no schedule info: nothing added
  assert.equal(node.widgets.length, 1);
  node.onExecuted(UI);
  node.onExecuted(UI); // twice: still one timeline widget
  assert.equal(prevCalled, 3, "the previous onExecuted is still called");
  const w = node.widgets.filter((x) => x.name === "dpcache_timeline");
  assert.equal(w.length, 1);
  assert.equal(w[0].serialize, false);
  assert.equal(w[0].options.serialize, false);
  assert.equal(w[0].options.canvasOnly, true);
  assert.ok(node.size[1] >= 120);
  const ctx = fakeCtx();
  w[0].draw(ctx, node, 300, 50, 20);
  assert.equal(ctx.calls.rects, 12);
  assert.ok(ctx.calls.texts[0].startsWith("4/12 key"));

  // run event updates an Apply node
  await e.setup();
  const apply = Object.assign(new FakeNode("DPCacheApply"), {});
  Apply.prototype.onExecuted.call(apply, UI);
  f.nodes.set(5, apply);
  for (const cb of f.listeners["dpcache.run"]) cb({ detail: { node: "5", computed: 4, skipped: 8, measured_speedup: 2.5 } });
  for (const cb of f.listeners["dpcache.run"]) cb({ detail: { node: "99", computed: 4, skipped: 8 } }); // unknown node
  for (const cb of f.listeners["dpcache.run"]) cb({ detail: "garbage" });
  assert.equal(apply.__dpcache.run.computed, 4);
  const ctx2 = fakeCtx();
  apply.widgets.find((x) => x.name === "dpcache_timeline").draw(ctx2, apply, 300, 0, 20);
  assert.ok(ctx2.calls.texts.some((t) => t.startsWith("last run: 4 computed")));

  // the plan that ran (another T, from the automatic mode) redraws Apply and the Schedule that fed it,
  // even a Schedule that never showed a plan ((auto) has none before the first run)
  const sched = new FakeNode("DPCacheSchedule");
  f.nodes.set(2, sched);
  for (const cb of f.listeners["dpcache.run"]) {
    cb({ detail: { node: "5", nodes: ["5", "2"], computed: 5, skipped: 15, num_evals: 20, key_steps: [0, 1, 2, 9, 15],
                   ideal_speedup: 4, source: "auto:auto_flux.safetensors", summary: "planned" } });
  }
  for (const n of [apply, sched]) {
    assert.equal(n.__dpcache.info.numEvals, 20);
    assert.deepEqual(n.__dpcache.info.keySteps, [0, 1, 2, 9, 15]);
    const c = fakeCtx();
    n.widgets.find((x) => x.name === "dpcache_timeline").draw(c, n, 300, 0, 20);
    assert.equal(c.calls.rects, 20);
    assert.ok(c.calls.texts[0].startsWith("5/20 key"));
    assert.ok(c.calls.texts.some((t) => t.startsWith("last run: 5 computed, 15 predicted")));
  }
});

test("degrades quietly: no comfyAPI, no app.js", async () => {
  delete globalThis.comfyAPI;
  await load(); // dynamic import of ../../scripts/app.js fails in Node: must not throw
});

test("degrades quietly: app without registerExtension, api without events, nodes without widgets", async () => {
  globalThis.comfyAPI = { app: { app: {} } };
  await load();
  const f = fakeFrontend();
  globalThis.comfyAPI = { app: { app: f.app }, api: {} };
  await load();
  const e = f.ext[0];
  await e.setup(); // no api: nothing registered, no throw
  class Sched {}
  await e.beforeRegisterNodeDef(Sched, { name: "DPCacheSchedule" });
  const bare = { size: [1, 1] }; // no addCustomWidget / computeSize / setSize
  Sched.prototype.onExecuted.call(bare, UI);
  await e.beforeRegisterNodeDef(undefined, { name: "DPCacheSchedule" });
  await e.beforeRegisterNodeDef(Sched, undefined);
  delete globalThis.comfyAPI;
});
