"""PACT files: round trip, damaged files, and the pickle importer that never runs code."""
import os
import pickle
import time

import numpy as np
import pytest

from dpcache_core import PactAccumulator, PactFileError, import_reference_pkl, load_pact, save_pact


def sample_acc(num_evals=6, samples=3, seed=0):
    rng = np.random.default_rng(seed)
    acc = PactAccumulator(num_evals)
    for _ in range(samples):
        cost = rng.random((num_evals, num_evals + 1, num_evals + 1))
        cost[rng.random(cost.shape) < 0.3] = np.inf
        acc.add(cost)
    return acc


def test_round_trip(tmp_path):
    acc = sample_acc()
    path = str(tmp_path / "sub" / "flux.safetensors")
    written = save_pact(path, acc, {"model_family": "flux", "order": 2, "scheme": "reference", "sampler": "euler"})
    assert written["samples"] == 3 and written["num_evals"] == 6 and written["pack_version"]
    loaded, meta = load_pact(path)
    assert meta["model_family"] == "flux" and meta["sampler"] == "euler" and meta["samples"] == 3
    assert loaded.samples == 3
    np.testing.assert_array_equal(loaded.sums, acc.sums)
    np.testing.assert_array_equal(loaded.counts, acc.counts)
    np.testing.assert_array_equal(loaded.mean(), acc.mean())
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["flux.safetensors"]  # no temp files left


def test_samples_added_later_merge_exactly(tmp_path):
    path = str(tmp_path / "p.safetensors")
    first, second = sample_acc(seed=1), sample_acc(seed=2)
    save_pact(path, first, {"model_family": "wan"})
    acc, meta = load_pact(path)
    acc.merge(second)
    save_pact(path, acc, meta)
    both = sample_acc(seed=1)
    both.merge(second)
    loaded, meta = load_pact(path)
    assert meta["samples"] == 6
    np.testing.assert_array_equal(loaded.mean(), both.mean())


def test_truncated_file_is_a_clear_error_and_the_old_file_survives_a_failed_write(tmp_path, monkeypatch):
    path = str(tmp_path / "p.safetensors")
    save_pact(path, sample_acc(), {})
    data = open(path, "rb").read()
    broken = str(tmp_path / "broken.safetensors")
    with open(broken, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(PactFileError, match="broken.safetensors is damaged"):
        load_pact(broken)

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("dpcache_core.store.os.replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_pact(path, sample_acc(seed=5), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.safetensors", "p.safetensors"]  # no temp file
    assert open(path, "rb").read() == data  # untouched


def test_wrong_shape_and_foreign_files(tmp_path):
    from safetensors.numpy import save_file

    wrong = str(tmp_path / "wrong.safetensors")
    save_file({"sums": np.zeros((3, 3, 3)), "counts": np.zeros((3, 3, 3), dtype=np.int32)}, wrong,
              metadata={"format": "dpcache-pact/1", "dpcache": '{"num_evals": 3}'})
    with pytest.raises(PactFileError, match="wrong shape"):
        load_pact(wrong)
    foreign = str(tmp_path / "lora.safetensors")
    save_file({"w": np.zeros(3)}, foreign)
    with pytest.raises(PactFileError, match="not a DPCache PACT"):
        load_pact(foreign)
    with pytest.raises(PactFileError, match="not found"):
        load_pact(str(tmp_path / "missing.safetensors"))


def test_import_reference_pickle(tmp_path):
    cost = np.full((4, 5, 5), np.inf)
    cost[1, 2, 3:] = [1.0, 2.0]
    for protocol in (2, 4, 5):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(cost, protocol=protocol))
        np.testing.assert_array_equal(import_reference_pkl(str(path)), cost)
    several = tmp_path / "samples.pkl"
    other = cost.copy()
    other[1, 2, 3:] = [3.0, 4.0]
    several.write_bytes(pickle.dumps(cost) + pickle.dumps(other))
    np.testing.assert_array_equal(import_reference_pkl(str(several))[1, 2, 3:], [2.0, 3.0])


class Payload:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_a_code_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(Payload(str(marker))))
    with pytest.raises(PactFileError, match="refused to load .*system"):
        import_reference_pkl(str(evil))
    assert not marker.exists()
    # Hidden after a genuine array, too.
    mixed = tmp_path / "mixed.pkl"
    mixed.write_bytes(pickle.dumps(np.zeros((2, 3, 3))) + pickle.dumps(Payload(str(marker))))
    with pytest.raises(PactFileError, match="refused"):
        import_reference_pkl(str(mixed))
    assert not marker.exists()
    notarray = tmp_path / "list.pkl"
    notarray.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(PactFileError, match="cost tensor"):
        import_reference_pkl(str(notarray))


def test_convert_reference_pickle_to_a_pact_file(tmp_path):
    from dpcache_core.convert import main

    cost = np.full((4, 5, 5), np.inf)
    cost[1, 2, 3:] = [1.0, 2.0]
    pkl = tmp_path / "final_3d_cost_matrix_flux.pkl"
    pkl.write_bytes(pickle.dumps(cost))
    out = tmp_path / "official_flux.safetensors"
    main([str(pkl), str(out), "--family", "flux"])
    acc, meta = load_pact(str(out))
    assert meta["model_family"] == "flux" and meta["scheme"] == "reference" and meta["num_evals"] == 4
    np.testing.assert_array_equal(acc.mean(), cost)


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_new_pact_gets_the_umask_mode_and_overwrite_keeps_the_old_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = tmp_path / "p.safetensors"
        save_pact(str(path), sample_acc(), {})
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # 0644 under 022, readable by others
        os.chmod(path, 0o640)
        save_pact(str(path), sample_acc(seed=3), {})
        assert path.stat().st_mode & 0o777 == 0o640
        assert sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors"]
    finally:
        os.umask(old)


@pytest.mark.parametrize("field, value", [
    ("positions", [0.0, 0.5, 1.0]),  # 3 values for T=6: 7 expected
    ("positions", "0 0.2 0.4"),
    ("eval_sigmas", [1.0] * 6),
    ("order", "two"),
    ("order", 2.5),
    ("order", 0),
    ("scheme", "magic"),
    ("convention", "history"),
    ("windows", [[0, 9, 1]]),
    ("samples", -1),
])
def test_metadata_of_the_wrong_type_or_length_is_a_pact_file_error_naming_the_field(tmp_path, field, value):
    path = str(tmp_path / "p.safetensors")
    save_pact(path, sample_acc(), {"model_family": "flux", "order": 2, "scheme": "reference"})
    import json
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open
    with safe_open(path, framework="np") as f:
        header = f.metadata()
    meta = json.loads(header["dpcache"])
    meta[field] = value
    header["dpcache"] = json.dumps(meta)
    save_file(load_file(path), path, metadata=header)
    with pytest.raises(PactFileError, match=f"p.safetensors: metadata field '{field}'"):
        load_pact(path)
    from dpcache_core.merge import merge_pacts  # every reader goes through the one check
    with pytest.raises(PactFileError, match=f"'{field}'"):
        merge_pacts([path, str(tmp_path / "q.safetensors")])


def test_metadata_of_the_right_shape_loads(tmp_path):
    path = str(tmp_path / "p.safetensors")
    meta = {"model_family": "flux", "order": 2, "scheme": "reference", "convention": "skip",
            "positions": [k / 6 for k in range(7)], "eval_sigmas": [1 - k / 6 for k in range(7)]}
    save_pact(path, sample_acc(), meta)
    assert load_pact(path)[1]["positions"] == meta["positions"]


def hold_until_killed(path, held):
    from dpcache_core.store import FileLock
    lock = FileLock(path)
    lock.__enter__()
    held.set()
    time.sleep(60)


def test_a_lock_whose_holder_was_killed_is_free_at_once(tmp_path):
    """A crash while holding the lock (ComfyUI killed mid-write) must not stall the next calibration."""
    import multiprocessing
    import signal
    from dpcache_core.store import FileLock
    path = str(tmp_path / "x.safetensors")
    ctx = multiprocessing.get_context("fork")
    held = ctx.Event()
    holder = ctx.Process(target=hold_until_killed, args=(path, held))
    holder.start()
    assert held.wait(10)
    with pytest.raises(TimeoutError, match="x.safetensors.lock is held"):
        with FileLock(path, timeout_s=0.3):
            pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    start = time.monotonic()
    with FileLock(path, timeout_s=5):
        assert time.monotonic() - start < 1.0
    assert not os.path.exists(path + ".lock")


def test_two_waiters_on_a_stale_lock_never_both_take_it(tmp_path, monkeypatch):
    """A lock file left by a crash (an hour old, a dead pid in it). Waiter B judges it stale, then is
    held up (as a busy machine might) while waiter A takes the lock; B must not take it as well."""
    import threading
    path = str(tmp_path / "x.safetensors")
    lock_path = path + ".lock"
    with open(lock_path, "w") as f:
        f.write("999999")
    old = time.time() - 3600
    os.utime(lock_path, (old, old))
    a_holds, inside, log = threading.Event(), [], []
    real_stat = os.stat

    def slow_stat(p, *args, **kwargs):
        result = real_stat(p, *args, **kwargs)
        if str(p) == lock_path and threading.current_thread().name == "B" and not log:
            log.append("B looked at the lock")
            a_holds.wait(1.0)  # B has read the old file's state; A goes first
        return result
    monkeypatch.setattr(os, "stat", slow_stat)
    from dpcache_core.store import FileLock

    def waiter(name):
        with FileLock(path, timeout_s=10):
            inside.append(name)
            if name == "A":
                a_holds.set()
            time.sleep(0.3)
            assert inside == [name], f"{inside} hold the lock at once"
            inside.remove(name)

    errors = []

    def run(name):
        try:
            waiter(name)
        except AssertionError as exc:
            errors.append(str(exc))

    b = threading.Thread(target=run, args=("B",), name="B")
    b.start()
    while not log:
        time.sleep(0.01)
    a = threading.Thread(target=run, args=("A",), name="A")
    a.start()
    a.join(15)
    b.join(15)
    assert not errors
