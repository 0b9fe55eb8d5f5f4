"""CPU tier: what a setting is, its file names, the nearest file, and safe concurrent adds (dpcache_core/settings.py)."""
from __future__ import annotations

import multiprocessing
import os
import threading
import time

import numpy as np
import pytest

from dpcache_core import load_pact
from dpcache_core.settings import (Setting, add_sample, nearest, sample_record, sigmas_hash,
                                   tensors_digest, weights_fingerprint)
from dpcache_core.store import FileLock, PactFileError, new_file_mode

BASE = Setting("flux", "w" * 16, "euler", "simple", sigmas_hash([1.0, 0.5, 0.0]), 8, 1)


def sample(t=8, value=1.0):
    cost = np.full((t, t + 1, t + 1), value)
    return cost


def test_every_field_changes_the_key_and_the_name():
    variants = [BASE.__class__(**dict(BASE.as_meta(), **{k: v})) for k, v in
                [("family", "wan"), ("weights", "v" * 16), ("sampler", "heun"), ("scheduler", "beta"),
                 ("sigmas", "x"), ("num_evals", 9), ("conds", 2), ("window", "0.00-0.50"), ("bucket", "tok256")]]
    keys = {BASE.key} | {v.key for v in variants}
    names = {BASE.file_name()} | {v.file_name() for v in variants}
    assert len(keys) == len(names) == 10
    assert BASE.file_name().startswith("auto_flux_euler_simple_8_") and BASE.file_name().endswith(".safetensors")
    assert Setting.from_meta(BASE.as_meta()) == BASE and Setting.from_meta({"family": "flux"}) is None


def test_sigmas_hash_ignores_float_noise_but_not_other_sigmas():
    assert sigmas_hash([1.0, 0.5, 0.0]) == sigmas_hash([1.0 + 1e-9, 0.5, 0.0])
    assert sigmas_hash([1.0, 0.5, 0.0]) != sigmas_hash([1.0, 0.6, 0.0])


def test_tensors_digest_sees_values_anywhere_in_every_tensor_shapes_and_dtypes():
    import torch
    weights = {f"blocks.{i}.{part}": torch.randn(64, 96) for i in range(3) for part in ("attn", "mlp", "norm")}
    base = tensors_digest(weights.items())
    assert base == tensors_digest(list(weights.items())[::-1])  # the order does not matter
    for name in weights:  # a change spread over any one tensor (a merged LoRA) is seen
        changed = dict(weights, **{name: weights[name] + 1e-3 * torch.randn(64, 2) @ torch.randn(2, 96)})
        assert tensors_digest(changed.items()) != base, name
    assert tensors_digest(dict(weights, extra=torch.zeros(1)).items()) != base
    assert tensors_digest({k: v.half() for k, v in weights.items()}.items()) != base
    meta = tensors_digest([("a", torch.empty(4, device="meta")), ("b", torch.ones(3))])  # never raises
    assert meta != tensors_digest([("a", torch.empty(5, device="meta")), ("b", torch.ones(3))])


def test_weights_fingerprint_sees_the_weights_patches_and_hooks():
    import torch
    lora = {"k": [(0.8, ("lora", (torch.ones(4, 2), torch.ones(2, 4))), 1.0, None, None)]}
    base = weights_fingerprint("w")
    assert base == weights_fingerprint("w", {}, {}) and base != weights_fingerprint("v")
    assert weights_fingerprint("w", lora) not in (base, weights_fingerprint("w", {"k": [(1.0,) + lora["k"][0][1:]]}))
    assert weights_fingerprint("w", None, {object(): lora}) == weights_fingerprint("w", None, {object(): lora})
    assert weights_fingerprint("w", None, {object(): lora}) != base


def write(folder, setting, n=1):
    path = os.path.join(folder, setting.file_name())
    for _ in range(n):
        add_sample(path, setting, sample(setting.num_evals), {"model_family": setting.family, "order": 1},
                   sample_record("64x64", 1, setting.sampler, setting.scheduler))
    return path


def test_nearest_prefers_the_exact_file_then_same_sampler_then_closest_count(tmp_path):
    assert nearest(str(tmp_path), BASE) is None
    other_model = Setting(**dict(BASE.as_meta(), weights="v" * 16))
    write(tmp_path, other_model)
    assert nearest(str(tmp_path), BASE) is None  # another model never transfers
    far = Setting(**dict(BASE.as_meta(), num_evals=20))
    near = Setting(**dict(BASE.as_meta(), num_evals=10))
    beta = Setting(**dict(BASE.as_meta(), num_evals=8, scheduler="beta", sigmas="b"))
    for s in (far, near, beta):
        write(tmp_path, s)
    found = nearest(str(tmp_path), BASE)
    assert not found.exact and found.name == near.file_name()  # same sampler and scheduler before the closer count
    write(tmp_path, BASE)
    found = nearest(str(tmp_path), BASE)
    assert found.exact and found.name == BASE.file_name()
    (tmp_path / near.file_name()).write_bytes(b"damaged")
    assert nearest(str(tmp_path), Setting(**dict(BASE.as_meta(), num_evals=11))).name == BASE.file_name()  # near (T=10) is damaged: skipped


def test_add_sample_keeps_per_sample_metadata_and_the_umask_mode(tmp_path):
    path = write(tmp_path, BASE, n=2)
    acc, meta = load_pact(path)
    assert acc.samples == 2 and meta["setting"] == BASE.as_meta() and len(meta["sample_meta"]) == 2
    assert meta["resolution"] == "64x64"
    add_sample(path, BASE, sample(), {}, sample_record("128x64", 2, "euler", "simple"))
    assert load_pact(path)[1]["resolution"] == ["128x64", "64x64"]
    assert (os.stat(path).st_mode & 0o777) == new_file_mode()
    assert sorted(os.listdir(tmp_path)) == [BASE.file_name()]  # no lock or temporary file left


def test_add_sample_refuses_a_damaged_file_or_another_setting(tmp_path):
    path = os.path.join(tmp_path, BASE.file_name())
    with open(path, "wb") as f:
        f.write(b"\0" * 64)
    with pytest.raises(PactFileError, match=BASE.file_name()):
        add_sample(path, BASE, sample(), {}, {})
    other = Setting(**dict(BASE.as_meta(), sampler="heun"))
    write(tmp_path, other)
    os.replace(os.path.join(tmp_path, other.file_name()), path)
    with pytest.raises(PactFileError, match="another setting"):
        add_sample(path, BASE, sample(), {}, {})


def add_in_process(path, value):
    add_sample(path, BASE, sample(value=value), {"order": 1}, sample_record("64x64", int(value), "euler", "simple"))


def test_concurrent_adds_from_processes_and_threads_all_land_in_one_whole_file(tmp_path):
    path = os.path.join(tmp_path, BASE.file_name())
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=add_in_process, args=(path, float(v))) for v in range(1, 5)]
    threads = [threading.Thread(target=add_in_process, args=(path, float(v))) for v in range(5, 9)]
    for p in procs + threads:
        p.start()
    for p in procs + threads:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    acc, meta = load_pact(path)
    assert acc.samples == 8 and sorted(r["seed"] for r in meta["sample_meta"]) == list(range(1, 9))
    assert np.isclose(acc.mean()[0, 0, 0], 4.5)  # the mean of all 8 samples: none lost


def test_a_stale_lock_is_taken_over_and_a_held_one_times_out(tmp_path):
    path = str(tmp_path / "x.safetensors")
    with open(path + ".lock", "w") as f:
        f.write("12345")
    old = time.time() - 3600
    os.utime(path + ".lock", (old, old))
    with FileLock(path):
        assert os.path.exists(path + ".lock")
        with pytest.raises(TimeoutError, match=rf"x.safetensors.lock is held .*pid {os.getpid()} on "):
            with FileLock(path, timeout_s=0.2):
                pass
    assert not os.path.exists(path + ".lock")
