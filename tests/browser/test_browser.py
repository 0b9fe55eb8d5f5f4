"""Browser tier: the pack in a real ComfyUI page, in headless Chromium.

Needs COMFYUI_PATH (see comfy_server.py), a Chromium (CHROMIUM_PATH or /usr/bin/chromium),
Node.js and playwright-core (NODE_PATH=<its node_modules> or PLAYWRIGHT_CORE=<package dir>);
skips with the reason when one is missing. Checks, with the classic canvas and with the
Vue-rendered nodes:
- the extension registers and no console error, page error or failed request comes from it;
- every workflow loads (serialize() gives back the same nodes, widget values and links) and the
  frontend's own graphToPrompt gives the same API prompt as tests/browser/workflow_api.py;
- with optional stand-in encoder nodes and tiny model files (not shipped here), a calibrated PACT is scheduled and sampled from the page and
  the Schedule / Apply nodes show their output (screenshots).
DPCACHE_SCREENSHOTS=<dir> copies the screenshots there (docs/ for the README).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from comfy_server import ComfyServer, comfy_paths, http  # noqa: E402
from workflow_api import FRONTEND_ONLY, to_harness, ui_to_api  # noqa: E402

WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))
pytestmark = [pytest.mark.comfy, pytest.mark.slow]


def skip_reason():
    comfy, why = comfy_paths()
    if comfy is None:
        return why
    if not shutil.which("node"):
        return "Node.js is not installed"
    chrome = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chrome or not os.path.exists(chrome):
        return "no Chromium (install the chromium package or set CHROMIUM_PATH)"
    probe = "require(process.env.PLAYWRIGHT_CORE || 'playwright-core')"
    if subprocess.run(["node", "-e", probe], capture_output=True, cwd=HERE).returncode != 0:
        return "playwright-core not found (npm install playwright-core somewhere; set NODE_PATH to its node_modules)"
    return None


@pytest.fixture(scope="module")
def server():
    why = skip_reason()
    if why:
        pytest.skip(why)
    with ComfyServer(port=8199) as srv:
        yield srv


def host_workflows(info):
    """The workflows whose node types this host has (FLUX.2's need ComfyUI 0.33 or later)."""
    usable = []
    for path in WORKFLOWS:
        with open(path) as f:
            types = {n["type"] for n in json.load(f)["nodes"]} - FRONTEND_ONLY
        if types <= set(info):
            usable.append(path)
        else:
            print(f"\n[browser] {os.path.basename(path)}: not on this ComfyUI (no {', '.join(sorted(types - set(info)))})")
    return usable


def check_ui(server, out, *extra):
    cmd = ["node", os.path.join(HERE, "check_ui.mjs"), "--url", server.url, "--out", str(out), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    res_path = os.path.join(out, "result.json")
    assert p.returncode == 0 and os.path.exists(res_path), f"{p.stdout}\n{p.stderr}"
    with open(res_path) as f:
        return json.load(f)


def assert_clean(res):
    assert res["extensionLoaded"], "the dpcache.ui extension did not register"
    assert res["help"] == {k: 200 for k in ("DPCacheCalibrate", "DPCacheSchedule", "DPCacheApply")}, res["help"]
    ours = res["ours"]
    assert not ours, "console problems from the DPCache extension:\n" + "\n".join(json.dumps(m) for m in ours)


def showcase_spec(pact):
    """Tiny FLUX sampled with a calibrated PACT, queued from the page (for the node screenshots)."""
    nodes = {
        "unet": ["UNETLoader", [20, 60], {"unet_name": "tiny_flux.safetensors", "weight_dtype": "default"}],
        "cal": ["DPCacheCalibrate", [20, 200], {"pact_name": "flux_dev_euler_50", "order": 2, "reset": False},
                {"size": [280, 130]}],
        "sched": ["DPCacheSchedule", [330, 60], {"pact": pact, "key_steps": 13, "first_full_steps": 3,
                                                 "last_full_steps": 0, "total_evaluations": 50, "manual_key_steps": ""},
                  {"size": [380, 250]}],
        "apply": ["DPCacheApply", [20, 390], {}, {"size": [280, 60]}],
        "pic": ["PreviewImage", [740, 60], {}, {"title": "DPCache schedule picture", "size": [440, 470]}],
        "pos": ["HarnessRandomConditioning", [20, 700], {"seed": 1, "family": "flux"}],
        "neg": ["ConditioningZeroOut", [20, 950], {}],
        "lat": ["HarnessEmptyLatent", [330, 700], {"family": "flux", "width": 128, "height": 128}],
        "ks": ["KSampler", [1230, 60], {"seed": 7, "control_after_generate": "fixed", "steps": 50, "cfg": 1.0,
                                        "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}],
        "stats": ["HarnessLatentStats", [1230, 400], {"label": "showcase"}],
    }
    links = [["unet", 0, "cal", "model"], ["unet", 0, "apply", "model"], ["sched", 0, "apply", "schedule"],
             ["sched", 1, "pic", "images"], ["apply", 0, "ks", "model"], ["pos", 0, "ks", "positive"],
             ["pos", 0, "neg", "conditioning"], ["neg", 0, "ks", "negative"], ["lat", 0, "ks", "latent_image"],
             ["ks", 0, "stats", "samples"]]
    shots = {"nodes.png": ["DPCacheCalibrate", "DPCacheSchedule", "DPCacheApply", "PreviewImage"]}
    return {"nodes": nodes, "links": links, "shots": shots, "view": {"scale": 1.0, "offset": [20, 60]}}


def calibrate(server, info, name, runs=2):
    with open(os.path.join(ROOT, "workflows", "flux_calibrate.json")) as f:
        prompt = to_harness(ui_to_api(json.load(f), info), "calibrate")
    for n in prompt.values():
        if n["class_type"] == "DPCacheCalibrate":
            n["inputs"]["pact_name"] = name
    for seed in range(1, runs + 1):
        for n in prompt.values():
            if n["class_type"] == "KSampler":
                n["inputs"]["seed"] = seed
        entry = server.run_prompt(prompt, timeout=900)
        assert entry["status"]["status_str"] == "success", entry["status"]


def comparable(prompt):
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


def assert_same_prompt(frontend: dict, ours: dict, name: str) -> None:
    """The frontend's prompt is ours: exactly for our nodes and the samplers; a newer ComfyUI may give
    other core nodes inputs our converter does not know (0.33: CreateVideo's bit_depth, SaveVideo's
    format options), so for those ours must be contained in the frontend's."""
    assert frontend.keys() == ours.keys(), name
    for key, node in ours.items():
        got = frontend[key]
        assert got["class_type"] == node["class_type"], (name, key)
        if node["class_type"].startswith(("DPCache", "KSampler")):
            assert got["inputs"] == node["inputs"], (name, key)
        else:
            assert node["inputs"].items() <= got["inputs"].items(), (name, key, got, node)


def test_classic_canvas(server, tmp_path):
    code, info = http("GET", server.url + "/object_info", timeout=120)
    assert code == 200
    workflows = host_workflows(info)
    extra = ["--workflows", *workflows]
    harness = "HarnessRandomConditioning" in info and "tiny_flux.safetensors" in \
        info["UNETLoader"]["input"]["required"]["unet_name"][0]
    if harness:
        calibrate(server, info, "showcase_flux")
        spec = tmp_path / "showcase.json"
        spec.write_text(json.dumps(showcase_spec("showcase_flux.safetensors")))
        extra += ["--showcase", str(spec)]
    res = check_ui(server, tmp_path, *extra)
    assert_clean(res)
    for path in workflows:
        name = os.path.splitext(os.path.basename(path))[0]
        r = res["workflows"][name]
        assert r["roundtrip_ok"], json.dumps(r.get("roundtrip"))[:3000]
        with open(path) as f:
            ours = comparable(ui_to_api(json.load(f), info))
        assert_same_prompt(comparable(r["prompt"]), ours, name)
    if harness:
        sc = res["showcase"]
        assert sc["error"] is None, sc["error"]
        print("showcase:", json.dumps(sc))
        # the extension's timeline appears once the Schedule node sends ui["dpcache_schedule"]
        for t in sc["timeline"]:
            assert t["numEvals"] == 50 and len(t["keySteps"]) == 13, t
    keep = os.environ.get("DPCACHE_SCREENSHOTS")
    if keep:
        save_small(res["screenshots"], keep)


def save_small(paths, folder):
    """Copy screenshots as palette PNGs (a fraction of the size) when Pillow is there."""
    os.makedirs(folder, exist_ok=True)
    for p in paths:
        dst = os.path.join(folder, os.path.basename(p))
        try:
            from PIL import Image
        except ImportError:
            shutil.copy(p, dst)
            continue
        with Image.open(p) as im:
            im.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)


def test_vue_nodes(server, tmp_path):
    code, info = http("GET", server.url + "/object_info", timeout=120)
    assert code == 200
    res = check_ui(server, tmp_path, "--vue", "--workflows", *host_workflows(info))
    assert_clean(res)
    assert all(r["roundtrip_ok"] for r in res["workflows"].values())
