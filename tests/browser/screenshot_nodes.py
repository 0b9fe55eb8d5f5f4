"""Re-take docs/nodes.png, the README's picture of the three nodes, from the real ComfyUI frontend.

    COMFYUI_PATH=<ComfyUI> NODE_PATH=<node_modules with playwright-core> python tests/browser/screenshot_nodes.py

Starts ComfyUI with this pack (comfy_server.py), lets headless Chromium (shoot_nodes.mjs) add
DPCache Calibrate, DPCache Schedule and Apply DPCache with their default inputs, and saves the
shot as a small palette PNG (``--out``, default docs/nodes.png). Re-run it whenever a node's
inputs change.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from comfy_server import ComfyServer, comfy_paths  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "nodes.png"))
    a = ap.parse_args(argv)
    comfy, why = comfy_paths()
    if comfy is None:
        print(f"screenshot_nodes: {why}", file=sys.stderr)
        return 2
    with ComfyServer(port=8191) as server, tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "nodes.png")
        p = subprocess.run(["node", os.path.join(HERE, "shoot_nodes.mjs"), "--url", server.url, "--out", raw],
                           capture_output=True, text=True, timeout=600)
        if p.returncode != 0 or not os.path.exists(raw):
            print(f"screenshot_nodes: the browser step failed:\n{p.stdout}\n{p.stderr}", file=sys.stderr)
            return 1
        failures = server.import_failures()
        if failures:
            print("screenshot_nodes: the pack failed to import:\n" + "\n".join(failures), file=sys.stderr)
            return 1
        from PIL import Image

        with Image.open(raw) as im:
            small = im.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        tmp_out = a.out + ".tmp"
        small.save(tmp_out, format="PNG", optimize=True)
        os.replace(tmp_out, a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
