// Writes workflows/*.json from the specs in make_workflows.mjs WITHOUT a browser, for machines
// that have no Chromium: the node shapes (inputs, outputs, widget values, links, order) follow what
// the frontend's graph.serialize() saves, from ComfyUI's node definitions (GET /object_info saved
// as JSON). Node sizes are estimates (the frontend measures text). Prefer make_workflows.mjs where
// a browser is available; tests/test_workflows.py checks both kinds of output the same way, and
// `--check` compares this serializer with the browser-made files (sizes aside).
//   node tests/browser/make_workflows_offline.mjs OBJECT_INFO.json [--check] [file.json ...]
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import { SPECS } from "./make_workflows.mjs";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const WIDGET_TYPES = new Set(["INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"]);

function isWidget(spec) {
  const [t, opts = {}] = spec;
  return (Array.isArray(t) || WIDGET_TYPES.has(t)) && !opts.forceInput;
}

function inputSpecs(def) {
  return ["required", "optional"].flatMap((sec) => Object.entries(def.input[sec] ?? {}).map(([n, s]) => [n, s, sec]));
}

function widgetValue(name, spec, given) {
  if (name in given) return given[name];
  const [t, opts = {}] = spec;
  if (opts.default !== undefined) return opts.default;
  if (Array.isArray(t)) return t[0];
  return { INT: 0, FLOAT: 0, STRING: "", BOOLEAN: false }[t];
}

export function serialize(spec, info) {
  const keys = Object.keys(spec.nodes);
  const id = Object.fromEntries(keys.map((k, i) => [k, i + 1]));
  const nodes = {};
  for (const key of keys) {
    const [type, pos, widgets, opts = {}] = spec.nodes[key];
    if (type === "Note") {
      nodes[key] = { id: id[key], type, pos, size: opts.size ?? [400, 200], flags: {}, order: 0, mode: 0, inputs: [],
                     outputs: [], properties: {}, widgets_values: [opts.text], color: "#432", bgcolor: "#653" };
      continue;
    }
    const def = info[type];
    if (!def) throw new Error(`no definition for ${type}`);
    const specs = inputSpecs(def);
    const conn = specs.filter(([, s]) => !isWidget(s)).map(([name, s, sec]) => ({
      localized_name: name, name, ...(sec === "optional" ? { shape: 7 } : {}), type: s[0], link: null }));
    const wid = specs.filter(([, s]) => isWidget(s)).flatMap(([name, s, sec]) => [
      { localized_name: name, name, ...(sec === "optional" ? { shape: 7 } : {}), type: Array.isArray(s[0]) ? "COMBO" : s[0],
        widget: { name }, link: null },
      ...(s[1]?.image_upload ? [{ localized_name: "choose file to upload", name: "upload", type: "IMAGEUPLOAD", widget: { name: "upload" }, link: null }] : []),
    ]);
    const values = [];
    for (const [name, s] of specs.filter(([, s]) => isWidget(s))) {
      values.push(widgetValue(name, s, widgets));
      if (s[1]?.control_after_generate) values.push(widgets.control_after_generate ?? "randomize");
      if (s[1]?.image_upload) values.push(widgets.upload ?? "image");
    }
    const outputs = def.output.map((t, i) => ({ localized_name: def.output_name[i], name: def.output_name[i], type: t, links: null }));
    const n = { id: id[key], type, pos, size: opts.size ?? [270, 58 + 24 * (wid.length + Math.max(conn.length, outputs.length))],
                flags: {}, order: 0, mode: 0, inputs: [...conn, ...wid], outputs,
                properties: type === "SaveImage" ? {} : { "Node name for S&R": type } };  // as the frontend saves them
    if (opts.title && opts.title !== (def.display_name ?? type)) n.title = opts.title;
    if (values.length) n.widgets_values = values;
    nodes[key] = n;
  }
  const links = [];
  for (const [a, slot, b, input] of spec.links) {
    const out = nodes[a].outputs[slot];
    const inp = nodes[b].inputs.find((x) => x.name === input);
    if (!out || !inp) throw new Error(`cannot connect ${a}:${slot} -> ${b}.${input}`);
    const lid = links.length + 1;
    links.push([lid, nodes[a].id, slot, nodes[b].id, nodes[b].inputs.indexOf(inp), out.type]);
    out.links = [...(out.links ?? []), lid];
    inp.link = lid;
  }
  // execution order as LiteGraph computes it: nodes without inputs first, then each once its sources are placed
  const placed = new Set();
  let order = 0;
  while (placed.size < keys.length) {
    const before = placed.size;
    for (const k of keys) {
      if (placed.has(k)) continue;
      const srcs = links.filter((l) => l[3] === nodes[k].id).map((l) => l[1]);
      if (srcs.every((s) => placed.has(keys[s - 1]))) {
        nodes[k].order = order++;
        placed.add(k);
      }
    }
    if (placed.size === before) throw new Error("cycle in " + spec.file);
  }
  return {
    id: "00000000-0000-0000-0000-000000000000", revision: 0, last_node_id: keys.length, last_link_id: links.length,
    nodes: keys.map((k) => nodes[k]), links, groups: [], config: {}, extra: { ds: { scale: 0.8, offset: [40, 40] } }, version: 0.4,
  };
}

function strip(wf) {  // what --check compares: everything but sizes and node order within the list
  const copy = JSON.parse(JSON.stringify(wf));
  for (const n of copy.nodes) delete n.size;
  copy.nodes.sort((a, b) => a.id - b.id);
  return copy;
}

function main() {
  const [infoPath, ...rest] = process.argv.slice(2);
  if (!infoPath) throw new Error("usage: make_workflows_offline.mjs OBJECT_INFO.json [--check] [file.json ...]");
  const info = JSON.parse(readFileSync(infoPath, "utf8"));
  const check = rest.includes("--check");
  const files = rest.filter((a) => a !== "--check");
  for (const spec of SPECS.filter((s) => !files.length || files.includes(s.file))) {
    const wf = serialize(spec, info);
    const path = join(ROOT, "workflows", spec.file);
    if (check) {
      const saved = JSON.parse(readFileSync(path, "utf8"));
      const same = JSON.stringify(strip(wf)) === JSON.stringify(strip(saved));
      console.log(`${spec.file}: ${same ? "same as the saved file (sizes aside)" : "DIFFERS from the saved file"}`);
      continue;
    }
    writeFileSync(path, JSON.stringify(wf, null, 2) + "\n");
    console.log(`wrote workflows/${spec.file}: ${wf.nodes.length} nodes, ${wf.links.length} links`);
  }
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) main();
