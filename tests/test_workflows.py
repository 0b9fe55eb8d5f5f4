"""The example workflows in workflows/ (UI format, as the ComfyUI frontend saves them).

CPU tier (always): structure, links and link types, widget counts and values of the pack's
nodes against their INPUT_TYPES (imported without ComfyUI), widget counts of the core nodes
used, settings that must agree (total_evaluations = sampler steps), and a Note in each.

Real-host tier (COMFYUI_PATH set; see tests/browser/comfy_server.py): every node type is
registered in a running ComfyUI and every workflow converts to an API prompt that the server
accepts; with optional stand-in encoder nodes and tiny model files (not shipped here) each workflow
also runs end to end: calibration twice; every FLUX, Wan and Qwen-Image workflow as shipped (the
automatic mode: run 1 computes everything, run 2 is planned); FLUX text-to-image with a DPCache
Schedule connected, on the calibrated PACT, the shipped PACT and "(uniform)"."""
from __future__ import annotations

import glob
import importlib
import importlib.util
import json
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "browser"))
from workflow_api import input_specs, is_widget, to_harness, ui_to_api, widget_names  # noqa: E402

WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))
NAMES = [os.path.splitext(os.path.basename(p))[0] for p in WORKFLOWS]
OUR_TYPES = {"DPCacheCalibrate", "DPCacheSchedule", "DPCacheApply"}

# Saved widget values of the core nodes these workflows use (ComfyUI 0.3.64, frontend 1.27).
CORE_WIDGETS = {
    "UNETLoader": 2, "DualCLIPLoader": 4, "CLIPLoader": 3, "VAELoader": 1, "CLIPVisionLoader": 1,
    "LoadImage": 2, "CLIPVisionEncode": 1, "CLIPTextEncode": 1, "FluxGuidance": 1, "ConditioningZeroOut": 0,
    "EmptySD3LatentImage": 3, "EmptyHunyuanLatentVideo": 4, "WanImageToVideo": 4, "ModelSamplingSD3": 1,
    "KSampler": 7, "KSamplerAdvanced": 10, "ModelSamplingAuraFlow": 1, "VAEDecode": 0, "SaveImage": 1, "PreviewImage": 0, "CreateVideo": 1, "SaveVideo": 3, "Note": 1,
    # ComfyUI 0.33 (FLUX.2's template: SamplerCustomAdvanced)
    "BasicGuider": 0, "RandomNoise": 2, "KSamplerSelect": 1, "SamplerCustomAdvanced": 0, "Flux2Scheduler": 3, "EmptyFlux2LatentImage": 3,
}
# workflows that need node types ComfyUI 0.33 added (older hosts lack them; Z-Image's nodes exist in 0.3.64 too)
NEWER_HOST = {"flux2_dev_dpcache": ("EmptyFlux2LatentImage", "Flux2Scheduler")}
SHIPPED_PACTS = os.path.join(ROOT, "cost_matrices")
ONE_EVAL_PER_STEP = {"euler", "euler_ancestral", "uni_pc", "uni_pc_bh2", "ddim", "lcm", "dpmpp_2m", "ipndm", "deis", "res_multistep"}


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def pack_mappings():
    """The pack's NODE_CLASS_MAPPINGS, imported without ComfyUI under a private module name
    (the name `nodes` may already be ComfyUI's own module in this process)."""
    name = "_dpcache_pack_nodes"
    if name not in sys.modules:
        if ROOT not in sys.path:
            sys.path.insert(0, ROOT)  # for `import dpcache_core`
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(ROOT, "nodes", "__init__.py"), submodule_search_locations=[os.path.join(ROOT, "nodes")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name].NODE_CLASS_MAPPINGS


def pack_defs():
    """INPUT_TYPES / RETURN_TYPES of the pack's nodes."""
    return {k: {"input": c.INPUT_TYPES(), "output": list(c.RETURN_TYPES)} for k, c in pack_mappings().items()}


def by_id(wf):
    return {n["id"]: n for n in wf["nodes"]}


def test_there_are_the_eight_workflows():
    assert set(NAMES) == {"flux_t2i_dpcache", "flux_calibrate", "wan21_t2v_dpcache", "wan21_i2v_dpcache",
                          "wan22_i2v_dpcache", "qwen_image_dpcache", "z_image_turbo_dpcache", "flux2_dev_dpcache"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=NAMES)
def test_structure_and_links(path):
    wf = load(path)
    assert wf["version"] == 0.4 and isinstance(wf["nodes"], list) and isinstance(wf["links"], list)
    nodes = by_id(wf)
    assert len(nodes) == len(wf["nodes"]), "duplicate node ids"
    assert wf["last_node_id"] >= max(nodes)
    link_ids = [l[0] for l in wf["links"]]
    assert len(set(link_ids)) == len(link_ids) and wf["last_link_id"] >= max(link_ids)
    for lid, src, sslot, dst, dslot, typ in wf["links"]:
        out, inp = nodes[src]["outputs"][sslot], nodes[dst]["inputs"][dslot]
        assert lid in (out.get("links") or []), f"link {lid} missing from node {src} output {sslot}"
        assert inp["link"] == lid, f"link {lid} does not end at node {dst} input {dslot}"
        assert out["type"] == typ == inp["type"], f"link {lid}: {out['type']} -> {inp['type']} as {typ}"
    for n in wf["nodes"]:
        for i in n.get("inputs", []):
            if i.get("link") is not None:
                assert i["link"] in link_ids, f"node {n['id']} input {i['name']} points to a missing link"
        for o in n.get("outputs", []):
            for lid in o.get("links") or []:
                assert lid in link_ids
        assert n["type"] in CORE_WIDGETS or n["type"] in OUR_TYPES, f"unexpected node type {n['type']}"
        assert n.get("mode", 0) == 0, f"node {n['id']} {n['type']} is muted or bypassed"


@pytest.mark.parametrize("path", WORKFLOWS, ids=NAMES)
def test_core_widget_counts(path):
    for n in load(path)["nodes"]:
        if n["type"] in CORE_WIDGETS:
            assert len(n.get("widgets_values") or []) == CORE_WIDGETS[n["type"]], n["type"]


def check_value(name, spec, value):
    t = spec[0]
    opts = spec[1] if len(spec) > 1 else {}
    if isinstance(t, list):
        assert value in t, f"{name}={value!r} is not one of {t}"
    elif t == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), f"{name}={value!r} is not an int"
        assert opts.get("min", value) <= value <= opts.get("max", value), f"{name}={value} out of range"
    elif t == "FLOAT":
        assert isinstance(value, (int, float)) and opts.get("min", value) <= value <= opts.get("max", value)
    elif t == "BOOLEAN":
        assert isinstance(value, bool), f"{name}={value!r} is not a boolean"
    elif t == "STRING":
        assert isinstance(value, str), f"{name}={value!r} is not a string"


@pytest.mark.parametrize("path", WORKFLOWS, ids=NAMES)
def test_pack_nodes_match_their_definitions(path):
    defs = pack_defs()
    wf = load(path)
    ours = [n for n in wf["nodes"] if n["type"] in OUR_TYPES]
    assert ours, "no DPCache node in this workflow"
    for n in ours:
        d = defs[n["type"]]
        specs = dict(input_specs(d))
        names = widget_names(d)
        values = n.get("widgets_values") or []
        assert len(values) == len(names), f"{n['type']}: {len(values)} widget values for {names}"
        for name, value in zip(names, values):
            check_value(f"{n['type']}.{name}", specs[name], value)
        # connection inputs: present with the right type, every required one linked
        slots = {i["name"]: i for i in n.get("inputs", [])}
        for name, spec in input_specs(d):
            if is_widget(spec):
                continue
            assert name in slots and slots[name]["type"] == spec[0], f"{n['type']}.{name} slot"
            if name in d["input"]["required"]:
                assert slots[name]["link"] is not None, f"{n['type']}.{name} is not connected"
        assert [o["type"] for o in n.get("outputs", [])] == d["output"], f"{n['type']} outputs"


def model_source(wf, sampler):
    nodes, links = by_id(wf), {l[0]: l for l in wf["links"]}
    return nodes[links[next(i["link"] for i in sampler["inputs"] if i["name"] == "model")][1]]


@pytest.mark.parametrize("path", WORKFLOWS, ids=NAMES)
def test_settings_agree(path):
    wf = load(path)
    ks = [n for n in wf["nodes"] if n["type"] == "KSampler"]
    advanced = [n for n in wf["nodes"] if n["type"] == "KSamplerAdvanced"]
    if advanced:  # Wan2.2 A14B: two experts, each a window of one trajectory
        assert len(advanced) == 2 and not ks
        (add1, _, control, steps, cfg, sampler, scheduler, start1, end1, leftover1), second = (
            advanced[0]["widgets_values"], advanced[1]["widgets_values"])
        assert (add1, start1, leftover1) == ("enable", 0, "enable") and sampler in ONE_EVAL_PER_STEP
        assert (second[0], second[3], second[5], second[6], second[7], second[9]) == ("disable", steps, sampler, scheduler, end1, "disable")
        assert second[8] >= steps, "the second expert samples to the end"
        samplers = advanced
    elif not ks:  # SamplerCustomAdvanced (FLUX.2's template): steps in its scheduler, the model through the guider
        (custom,) = [n for n in wf["nodes"] if n["type"] == "SamplerCustomAdvanced"]
        (sampler,) = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "KSamplerSelect"]
        (steps,) = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "Flux2Scheduler"]
        (control,) = [n["widgets_values"][1] for n in wf["nodes"] if n["type"] == "RandomNoise"]
        assert sampler in ONE_EVAL_PER_STEP
        samplers = [n for n in wf["nodes"] if n["type"] == "BasicGuider"]
        assert len(samplers) == 1 and custom
    else:
        assert len(ks) == 1
        seed, control, steps, cfg, sampler, scheduler, denoise = ks[0]["widgets_values"]
        assert sampler in ONE_EVAL_PER_STEP and denoise == 1.0
        samplers = ks
    sources = [model_source(wf, k) for k in samplers]
    for n in wf["nodes"]:
        if n["type"] == "DPCacheSchedule":
            pact, k, first, last, total, manual, budget, speedup, taylor_order = n["widgets_values"]
            assert taylor_order == 2, "taylor_order keeps its default (used by (uniform)/(manual) only)"
            assert total == steps, "total_evaluations must equal the sampler's evaluations (one per step here)"
            assert len(samplers) * first + last <= k <= total
            assert all(m["type"] == "DPCacheApply" for m in sources), "Apply DPCache must feed every sampler"
            if pact not in ("(uniform)", "(manual)"):
                check_shipped_pact_fits(wf, pact)
        if n["type"] == "DPCacheCalibrate":
            assert re.fullmatch(r"[A-Za-z0-9._-]+", n["widgets_values"][0])
            assert all(m["type"] == "DPCacheCalibrate" for m in sources) and control == "randomize"
        if n["type"] == "DPCacheApply":
            target_speedup, refine_every = n["widgets_values"]
            assert target_speedup >= 1.0 and refine_every == 0, "automatic mode: calibrate once, by default"
            assert n in sources, "Apply DPCache feeds a sampler"


def check_shipped_pact_fits(wf, pact):
    """A workflow's PACT is one shipped in cost_matrices/, for the family of the workflow's model."""
    sys.path.insert(0, ROOT)
    from dpcache_core import load_pact

    path = os.path.join(SHIPPED_PACTS, pact)
    assert os.path.isfile(path), f"{pact} is not shipped in cost_matrices/ (a user would not have it)"
    _, meta = load_pact(path)
    unet = next(n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "UNETLoader").lower()
    family = "flux" if "flux" in unet else "wan" if "wan" in unet else None
    assert meta["model_family"] == family, f"{pact} is a {meta['model_family']} PACT but the workflow loads {unet}"


AUTOMATIC = ("flux_t2i_dpcache", "wan21_t2v_dpcache", "wan21_i2v_dpcache", "wan22_i2v_dpcache", "qwen_image_dpcache",
             "z_image_turbo_dpcache", "flux2_dev_dpcache")


def test_the_model_workflows_use_the_automatic_mode():
    """Apply DPCache with no schedule connected (issue 17); the Note says what happens on the first run
    and how to use the shipped PACT instead."""
    shipped = {"flux_t2i_dpcache": "flux1_dev_official_T50.safetensors", "wan21_t2v_dpcache": "wan21_i2v_14b_official_T50.safetensors",
               "wan21_i2v_dpcache": "wan21_i2v_14b_official_T50.safetensors", "wan22_i2v_dpcache": "wan21_i2v_14b_official_T50.safetensors"}
    for name in AUTOMATIC:
        wf = load(os.path.join(ROOT, "workflows", name + ".json"))
        assert not [n for n in wf["nodes"] if n["type"] == "DPCacheSchedule"], name
        applies = [n for n in wf["nodes"] if n["type"] == "DPCacheApply"]
        assert len(applies) == (2 if name.startswith("wan22") else 1), name
        for n in applies:
            slot = next(i for i in n["inputs"] if i["name"] == "schedule")
            assert slot["link"] is None, f"{name}: Apply DPCache's schedule must be left unconnected (automatic mode)"
        text = next(n for n in wf["nodes"] if n["type"] == "Note")["widgets_values"][0]
        assert "AUTOMATIC MODE" in text and "calibrating this setting (run 1)" in text and "LoRA" in text, name
        if name in shipped:
            assert shipped[name] in text and os.path.isfile(os.path.join(SHIPPED_PACTS, shipped[name])), name
    cal = load(os.path.join(ROOT, "workflows", "flux_calibrate.json"))
    assert [n["type"] for n in cal["nodes"] if n["type"] in OUR_TYPES] == ["DPCacheCalibrate"]  # kept for sharing PACTs


@pytest.mark.parametrize("path", WORKFLOWS, ids=NAMES)
def test_note_explains_the_settings(path):
    notes = [n for n in load(path)["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1
    text = notes[0]["widgets_values"][0].lower()
    for word in ("calibrat", "speed-up", "pact"):
        assert word in text, word
    if "calibrate" not in os.path.basename(path):
        assert "key_steps (k)" in text and "total_evaluations" in text


def test_no_machine_paths():
    for p in WORKFLOWS:
        text = open(p, encoding="utf-8").read()
        assert not re.search(r"/(work|root|tmp|home)/", text), p


def test_conversion_of_pack_nodes_without_comfyui():
    """ui_to_api on our nodes alone (core nodes need the server's definitions)."""
    defs = pack_defs()
    wf = load(os.path.join(ROOT, "workflows", "flux_t2i_dpcache.json"))
    keep = [n for n in wf["nodes"] if n["type"] in OUR_TYPES]
    api = ui_to_api({"nodes": keep, "links": wf["links"]}, defs)
    apply = next(v for v in api.values() if v["class_type"] == "DPCacheApply")
    # automatic mode: no schedule input at all, the budget widgets as saved
    assert {k: v for k, v in apply["inputs"].items() if k != "model"} == {"target_speedup": 3.85, "refine_every": 0}


# ---------------------------------------------------------------- real-host tier ----
@pytest.fixture(scope="module")
def server():
    from comfy_server import ComfyServer, comfy_paths

    comfy, why = comfy_paths()
    if comfy is None:
        pytest.skip(why)
    with ComfyServer(port=8199) as srv:
        yield srv


@pytest.fixture(scope="module")
def object_info(server):
    from comfy_server import http

    code, info = http("GET", server.url + "/object_info", timeout=120)
    assert code == 200
    return info


def host_workflows(object_info, say=False):
    """The workflows this host can load: FLUX.2's needs the node types ComfyUI 0.33 added."""
    usable = []
    for name, path in zip(NAMES, WORKFLOWS):
        missing = [t for t in NEWER_HOST.get(name, ()) if t not in object_info]
        if missing:
            if say:
                print(f"\n[host] {name}: not on this ComfyUI (no {', '.join(missing)}: ComfyUI 0.33 or later)")
            continue
        usable.append(path)
    return usable


@pytest.mark.comfy
def test_real_host_registers_every_node_type(server, object_info):
    assert not server.import_failures(), server.import_failures()
    used = {n["type"] for p in host_workflows(object_info, say=True) for n in load(p)["nodes"]} - {"Note"}
    assert used <= set(object_info), sorted(used - set(object_info))


@pytest.mark.comfy
@pytest.mark.parametrize("path", WORKFLOWS, ids=NAMES)
def test_real_host_widget_counts(path, object_info):
    """Every saved node of this pack and every sampler has exactly the host's widget values. Other core
    nodes have at least their required ones: a newer host may add optional widgets after the file was
    saved (ComfyUI 0.33's CreateVideo bit_depth, left to their defaults) or turn saved widgets into input
    types of its own (0.33's SaveVideo format and codec)."""
    if path not in host_workflows(object_info):
        pytest.skip(f"{os.path.basename(path)} needs ComfyUI 0.33 or later (its node types)")
    for n in load(path)["nodes"]:
        if n["type"] in object_info:
            defn = object_info[n["type"]]
            saved = len(n.get("widgets_values") or [])
            if n["type"] in OUR_TYPES or n["type"] in ("KSampler", "KSamplerAdvanced"):
                assert saved == len(widget_names(defn)), n["type"]
            else:
                assert saved >= len(widget_names({"input": {"required": defn["input"].get("required") or {}}})), n["type"]


def have_harness(object_info):
    need = {"HarnessRandomConditioning", "HarnessEmptyLatent", "HarnessWanI2VConditioning", "HarnessLatentStats"}
    if not need <= set(object_info):
        pytest.skip("optional end-to-end runs: they need stand-in encoder nodes for tiny models (HarnessRandomConditioning, "
                    "HarnessEmptyLatent, ...; DPCACHE_HARNESS_NODES), which this repository does not ship")
    unets = object_info["UNETLoader"]["input"]["required"]["unet_name"][0]
    if "tiny_flux.safetensors" not in unets:
        pytest.skip("optional end-to-end runs: they need tiny_flux.safetensors and the tiny Wan models in that ComfyUI's "
                    "models/diffusion_models, which this repository does not ship")


def run_ok(server, prompt):
    entry = server.run_prompt(prompt, timeout=900)
    status = entry.get("status", {})
    errors = [m for m in status.get("messages", []) if m[0] == "execution_error"]
    assert status.get("status_str") == "success", f"{errors}\n{server.log_text()[-4000:]}"
    stats = [s for out in entry["outputs"].values() for s in out.get("harness_stats", [])]
    assert stats and all(s["finite"] for s in stats)
    return entry, stats


def block_calls(stats):
    bc = stats[0]["block_counts"]
    return bc["total_block_calls"], bc["full_block_calls"]


@pytest.mark.comfy
@pytest.mark.slow
def test_real_host_runs_every_workflow(server, object_info):
    have_harness(object_info)
    wfs = {n: load(p) for n, p in zip(NAMES, WORKFLOWS)}
    # 1. calibration: two queued prompts accumulate two samples in one PACT
    cal = to_harness(ui_to_api(wfs["flux_calibrate"], object_info), "flux_calibrate")
    for nid, n in cal.items():
        if n["class_type"] == "DPCacheCalibrate":
            n["inputs"]["pact_name"] = "wftest_flux"
            n["inputs"]["check_runs"] = 0  # every block call counted below is the recorded run's (check runs: tests/comfy/test_host_check_runs.py)
    for seed in (1, 2):
        for n in cal.values():
            if n["class_type"] == "KSampler":
                n["inputs"]["seed"] = seed
        _, stats = run_ok(server, cal)
        done, full = block_calls(stats)
        assert done == full, "calibration computes every evaluation"
    assert os.path.isfile(os.path.join(server.tmp, "dpcache", "wftest_flux.safetensors"))

    # 2. FLUX text-to-image as shipped: the automatic mode. The first run calibrates (every block
    #    computed), the second is planned (13 of 50 key steps); then with a DPCache Schedule connected,
    #    on the PACT calibrated above, on the shipped PACT and on "(uniform)"
    t2i = to_harness(ui_to_api(wfs["flux_t2i_dpcache"], object_info), "flux_t2i")
    check_automatic_runs(server, t2i, "flux_t2i_dpcache", planned_keys=13)
    for pact in ("wftest_flux.safetensors", "flux1_dev_official_T50.safetensors", "(uniform)"):
        check_planned_run(server, with_schedule(t2i, pact), "flux_t2i_dpcache", pact)

    # 3. Wan2.1 text-to-video and image-to-video, Qwen-Image, and Wan2.2 A14B (two experts, a block
    #    counter on each, each expert its own automatic setting), as shipped
    for name in ("wan21_t2v_dpcache", "wan21_i2v_dpcache", "qwen_image_dpcache", "wan22_i2v_dpcache"):
        prompt = to_harness(ui_to_api(wfs[name], object_info), name)
        check_automatic_runs(server, prompt, name)


def set_seed(prompt, seed):
    for n in prompt.values():
        for key in ("seed", "noise_seed"):
            if key in n["inputs"] and not isinstance(n["inputs"][key], list):
                n["inputs"][key] = seed


def with_schedule(prompt, pact):
    """The prompt with a DPCache Schedule (K 13 of 50) connected to its Apply DPCache."""
    prompt = json.loads(json.dumps(prompt))
    prompt["900"] = {"class_type": "DPCacheSchedule", "inputs": {
        "pact": pact, "key_steps": 13, "first_full_steps": 3, "last_full_steps": 0, "total_evaluations": 50,
        "manual_key_steps": "", "budget": "same speed-up", "target_speedup": 3.85, "taylor_order": 2}}
    for n in prompt.values():
        if n["class_type"] == "DPCacheApply":
            n["inputs"]["schedule"] = ["900", 0]
    set_seed(prompt, 7)
    return prompt


def check_automatic_runs(server, prompt, name, planned_keys=None):
    """Run 1 at a new setting computes every block (calibration); run 2 (another seed) skips some."""
    prompt = json.loads(json.dumps(prompt))
    set_seed(prompt, 1)
    _, stats = run_ok(server, prompt)
    first = [block_calls([s]) for s in stats]
    assert all(done == full for done, full in first), f"{name}: the first run must compute everything ({first})"
    set_seed(prompt, 2)
    _, stats = run_ok(server, prompt)
    second = [block_calls([s]) for s in stats]
    assert all(0 < done < full for done, full in second), f"{name}: the second run skipped nothing ({second})"
    if planned_keys is not None:
        assert all(done * 50 == full * planned_keys for done, full in second), f"{name}: {second}"
    print(f"\n[host] workflow {name} (automatic): block calls (computed, full) run 1 {first}, run 2 {second}")


def check_planned_run(server, prompt, name, pact):
    """The run succeeds, its schedule comes from ``pact``, and the blocks ran at its 13 key steps of 50 only."""
    entry, stats = run_ok(server, prompt)
    done, full = block_calls(stats)
    assert 0 < done < full, f"{name}: DPCache skipped nothing ({done}/{full} block calls)"
    sched_id = next(k for k, v in prompt.items() if v["class_type"] == "DPCacheSchedule")  # noqa: E501
    info = entry["outputs"][sched_id]["dpcache_schedule"][0]  # the web extension's input (web/dpcache_logic.js)
    source = "uniform" if pact == "(uniform)" else f"pact:{pact}"
    assert info["source"] == source and info["num_evals"] == 50 and len(info["key_steps"]) == 13
    assert done * 50 == full * 13, f"{name}: {done}/{full} block calls for 13 key steps of 50"
    print(f"\n[host] workflow {name} on {source}: keys {info['key_steps']}, block calls {done} of {full}")


def test_node_list_json_matches_the_pack():
    """node_list.json (ComfyUI-Manager's missing-node detection) lists exactly the registered node ids."""
    with open(os.path.join(ROOT, "node_list.json"), encoding="utf-8") as f:
        listed = json.load(f)
    assert set(listed) == set(pack_mappings())
