"""Start a real ComfyUI server with this pack, for the workflow and browser tiers.

ComfyUI is found through COMFYUI_PATH (its checkout); its Python through COMFYUI_PYTHON,
else <COMFYUI_PATH>/../venv/bin/python, else the running interpreter. Nothing in the ComfyUI
tree is changed: the pack is symlinked into a temporary custom_nodes folder added with an
extra_model_paths YAML, which also points the "dpcache" model folder, the output, temp and
user directories into the same temporary folder. The server listens on 127.0.0.1 only and
is stopped by its PID.

    python tests/browser/comfy_server.py [--port 8199]     # run until Ctrl-C (for manual checks)
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for real_tier
from real_tier import unset_reason  # noqa: E402

PACK_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOST = "127.0.0.1"
PACK_NAME = "ComfyUI-DPCache"  # the folder name users get from git clone


def comfy_paths():
    """(comfy_dir, python) or (None, reason)."""
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy:
        return None, unset_reason()
    if not os.path.isfile(os.path.join(comfy, "main.py")):
        return None, f"COMFYUI_PATH={comfy} has no main.py"
    py = os.environ.get("COMFYUI_PYTHON")
    if not py:
        cand = os.path.join(os.path.dirname(os.path.abspath(comfy)), "venv", "bin", "python")
        py = cand if os.path.exists(cand) else sys.executable
    return comfy, py


def free_port(preferred=8199):
    for port in [preferred] + list(range(preferred + 1, preferred + 50)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex((HOST, port)) != 0:
                return port
    raise RuntimeError("no free port near %d" % preferred)


def http(method, url, body=None, timeout=30):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode(errors="replace")


class ComfyServer:
    def __init__(self, port=8199, with_pack=True, extra_args=()):
        comfy, py = comfy_paths()
        if comfy is None:
            raise RuntimeError(py)
        self.comfy, self.python = comfy, py
        self.port = free_port(port)
        self.url = f"http://{HOST}:{self.port}"
        self.tmp = tempfile.mkdtemp(prefix="dpcache_comfy_")
        for d in ("custom_nodes", "output", "temp", "user", "dpcache"):
            os.makedirs(os.path.join(self.tmp, d))
        if with_pack:
            os.symlink(PACK_DIR, os.path.join(self.tmp, "custom_nodes", PACK_NAME))
        harness = os.environ.get("DPCACHE_HARNESS_NODES")  # optional: stand-in encoders for the tiny models
        if harness and os.path.isdir(harness) and not os.path.exists(os.path.join(comfy, "custom_nodes", os.path.basename(harness))):
            os.symlink(os.path.abspath(harness), os.path.join(self.tmp, "custom_nodes", os.path.basename(harness)))
        self.pack_module = PACK_NAME
        yaml = os.path.join(self.tmp, "extra_model_paths.yaml")
        with open(yaml, "w") as f:
            f.write("dpcache_test:\n"
                    f"    custom_nodes: {os.path.join(self.tmp, 'custom_nodes')}\n"
                    f"    dpcache: {os.path.join(self.tmp, 'dpcache')}\n")
        self.cmd = [py, "main.py", "--cpu", "--listen", HOST, "--port", str(self.port), "--disable-auto-launch",
                    "--extra-model-paths-config", yaml,
                    "--output-directory", os.path.join(self.tmp, "output"),
                    "--temp-directory", os.path.join(self.tmp, "temp"),
                    "--user-directory", os.path.join(self.tmp, "user"), *extra_args]
        self.log_path = os.path.join(self.tmp, "server.log")
        self.proc = None

    def start(self, timeout=180):
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=self.comfy, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} during startup:\n{self.log_text()[-3000:]}")
            try:
                if http("GET", self.url + "/system_stats", timeout=2)[0] == 200:
                    return self
            except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"ComfyUI not reachable after {timeout}s:\n{self.log_text()[-3000:]}")

    def log_text(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def import_failures(self):
        return [ln.strip() for ln in self.log_text().splitlines()
                if "IMPORT FAILED" in ln and self.pack_module in ln]

    def stop(self):
        try:
            if self.proc is not None and self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGTERM)  # only the process we started
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.kill(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=10)
        finally:
            if getattr(self, "log", None) is not None:
                self.log.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # --- running prompts -------------------------------------------------------------
    def run_prompt(self, prompt, timeout=600):
        """POST an API prompt, wait for it; returns the /history entry (raises on a rejected prompt)."""
        code, resp = http("POST", self.url + "/prompt", {"prompt": prompt, "client_id": "dpcache-tests"})
        if code != 200 or not isinstance(resp, dict) or "prompt_id" not in resp:
            raise RuntimeError(f"POST /prompt -> {code}: {json.dumps(resp)[:3000]}")
        pid = resp["prompt_id"]
        t0 = time.time()
        while time.time() - t0 < timeout:
            code, hist = http("GET", f"{self.url}/history/{pid}")
            if code == 200 and isinstance(hist, dict) and pid in hist:
                st = hist[pid].get("status", {})
                if st.get("completed") or st.get("status_str") == "error":
                    return hist[pid]
            time.sleep(0.25)
        raise RuntimeError(f"prompt {pid} did not finish in {timeout}s")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8199)
    ap.add_argument("--no-pack", action="store_true", help="start without this pack (baseline)")
    a = ap.parse_args()
    srv = ComfyServer(a.port, with_pack=not a.no_pack)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        srv.start()
        print(f"ComfyUI up at {srv.url} (pid {srv.proc.pid}); log {srv.log_path}; Ctrl-C stops it", flush=True)
        srv.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
