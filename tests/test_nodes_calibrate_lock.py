"""DPCache Calibrate adds its sample under the PACT file's lock, the automatic mode's (store.update_pact):
two processes calibrating into one file never lose a sample."""
from __future__ import annotations

import multiprocessing
import sys
import time

import nodes_fakes as F
from dpcache_core import load_pact
import dpcache_core.store as store


def slow_writes(delay=2.0):
    """Every save_pact waits ``delay`` s first: a slow disk, where an unlocked read-add-write loses samples."""
    original = store.save_pact

    def slow(*args, **kwargs):
        time.sleep(delay)
        return original(*args, **kwargs)
    for module in list(sys.modules.values()):
        if getattr(module, "save_pact", None) is original:
            module.save_pact = slow


def calibrate_in_process(folder, start, seed):
    import nodes.dpcache_nodes as nd
    from nodes.dpcache_nodes import DPCacheCalibrate
    nd.calibration_folder = lambda: folder
    slow_writes()
    (calib,) = DPCacheCalibrate().calibrate(F.FakePatcher(F.Flux()), "shared", 1, False)
    start.wait()
    F.sample(calib, cfg=2.0, seed=seed)


def test_two_processes_calibrating_one_pact_lose_no_sample(tmp_path):
    ctx = multiprocessing.get_context("spawn")  # fresh processes: torch after fork can hang in its thread pool
    start = ctx.Barrier(2)  # both sample at once
    procs = [ctx.Process(target=calibrate_in_process, args=(str(tmp_path), start, seed)) for seed in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    acc, meta = load_pact(str(tmp_path / "shared.safetensors"))
    assert acc.samples == 2 and sorted(r["seed"] for r in meta["sample_meta"]) == [1, 2]
    assert not (tmp_path / "shared.safetensors.lock").exists()
