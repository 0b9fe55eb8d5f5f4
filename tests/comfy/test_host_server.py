"""Optional: Apply DPCache through the real ComfyUI HTTP server (POST /prompt), with an external
host harness (a run_server.py, tiny model files and stand-in nodes; not shipped in this repository).
Set DPCACHE_HOST_HARNESS to its folder; skipped otherwise. tests/test_workflows.py covers the HTTP
server with the pack's own workflows without it."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for real_tier
from real_tier import unset_reason  # noqa: E402

pytestmark = pytest.mark.comfy

HARNESS = os.environ.get("DPCACHE_HOST_HARNESS", "")
PACK_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORKFLOW = {
    "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_wan_t2v.safetensors", "weight_dtype": "default"}},
    "2": {"class_type": "HarnessRandomConditioning", "inputs": {"seed": 1, "family": "wan", "tokens": 32, "scale": 1.0, "batch_size": 1}},
    "3": {"class_type": "HarnessRandomConditioning", "inputs": {"seed": 2, "family": "wan", "tokens": 32, "scale": 1.0, "batch_size": 1}},
    "4": {"class_type": "HarnessEmptyLatent", "inputs": {"family": "wan", "width": 128, "height": 128, "length": 9, "batch_size": 1}},
    "5": {"class_type": "DPCacheSchedule", "inputs": {"pact": "(uniform)", "key_steps": 8, "first_full_steps": 3,
                                                       "last_full_steps": 0, "total_evaluations": 20, "manual_key_steps": ""}},
    "6": {"class_type": "DPCacheApply", "inputs": {"model": ["1", 0], "schedule": ["5", 0]}},
    "7": {"class_type": "HarnessBlockCounter", "inputs": {"model": ["6", 0], "tag": "X"}},
    "8": {"class_type": "KSampler", "inputs": {"model": ["7", 0], "seed": 42, "steps": 20, "cfg": 5.0, "sampler_name": "euler",
                                                "scheduler": "simple", "positive": ["2", 0], "negative": ["3", 0],
                                                "latent_image": ["4", 0], "denoise": 1.0}},
    "9": {"class_type": "HarnessLatentStats", "inputs": {"samples": ["8", 0], "label": "dpcache", "counter_tag": "X"}},
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not os.path.isfile(os.path.join(HARNESS, "run_server.py")),
                    reason="optional: DPCACHE_HOST_HARNESS is not set (an external harness with run_server.py, tiny model files and stand-in nodes, not shipped in this repository)")
@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason=unset_reason())
def test_apply_through_the_http_server(tmp_path):
    wf = tmp_path / "wan_dpcache.json"
    wf.write_text(json.dumps(WORKFLOW))
    env = dict(os.environ, COMFYUI_DIR=os.environ["COMFYUI_PATH"], HARNESS_PYTHON=sys.executable)
    proc = subprocess.run([sys.executable, os.path.join(HARNESS, "run_server.py"), "--port", str(free_port()),
                           "--custom-node", PACK_DIR, "--workflow-file", str(wf)],
                          env=env, capture_output=True, text=True, timeout=300)
    print("\n" + proc.stdout[-1500:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ALL OK" in proc.stdout
    # Wan tiny model: 4 blocks x 8 key evaluations of 20
    assert re.search(r"block_calls=32/80", proc.stdout)
