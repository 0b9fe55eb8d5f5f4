"""PACT files: safetensors (sums, counts) + JSON metadata, written atomically; safe importers for
the reference implementation's cost tensors (its pickles, or plain .npy arrays)."""
from __future__ import annotations

import errno
import io
import json
import logging
import os
import pickle
import socket
import tempfile
import time
from typing import Callable

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from .pact import PactAccumulator
from .replay import check_trajectories

try:  # the lock: a kernel lock on the lock file, released by the system when its holder dies
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

FORMAT = "dpcache-pact/1"
PACK_VERSION = "0.1.0"
log = logging.getLogger("dpcache")


class PactFileError(ValueError):
    """A PACT file that cannot be used, with a message that says what to do."""

    __module__ = "dpcache"  # a stable name in ComfyUI's error dialog (not the pack's folder path)


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask (0644 under umask 022)."""
    try:  # Linux: read the umask without changing it (os.umask would, briefly, for every thread)
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half of it.

    A new file gets the mode any new file gets under the umask; an overwritten one keeps its mode
    (the temporary file of ``mkstemp`` alone would leave 0600, unreadable to other users).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    try:
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        mode = new_file_mode()
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_pact(path: str, acc: PactAccumulator, metadata: dict | None = None) -> dict:
    """Save ``acc`` with ``metadata`` (model_family, order, scheme, sampler, ...); returns the metadata written."""
    meta = dict(metadata or {})
    meta.update(num_evals=acc.num_evals, samples=acc.samples, pack_version=PACK_VERSION)
    tensors = {"sums": acc.sums, "counts": acc.counts.astype(np.int32)}
    if acc.history_sums is not None:  # optional (issue 11); files without it load as before
        tensors.update(history_sums=acc.history_sums, history_counts=acc.history_counts.astype(np.int32))
    if getattr(acc, "trajectories", None) is not None:  # optional replay trajectories; files without them plan as before
        tensors["trajectories"] = np.ascontiguousarray(acc.trajectories, dtype=np.float32)
    data = save(tensors, metadata={"format": FORMAT, "dpcache": json.dumps(meta, sort_keys=True)})
    write_atomic(path, data)
    return meta


def sample_sizes_of(meta: dict) -> dict[str, int]:
    """How many of a PACT's samples were built from each sample size S ("all": every element).

    Files written before sampled calibration existed say nothing: they kept every element.
    """
    sizes = meta.get("sample_sizes")
    if isinstance(sizes, dict):
        return {str(k): int(v) for k, v in sizes.items()}
    return {str(meta.get("sample_size", "all")): int(meta.get("samples", 0))}


def combine_sampling(metas: list[dict]) -> dict:
    """``sample_size``, ``sample_sizes`` and ``sample_seed`` of the union of PACTs with ``metas``.

    ``sample_sizes`` maps each S (or "all") to its number of samples; ``sample_size`` is the one S
    when there is one, else "mixed" (samples of different S estimate the same means, so they mix);
    ``sample_seed`` is the one seed, a sorted list when several, None when none was used.
    """
    sizes: dict[str, int] = {}
    seeds: set[int] = set()
    for meta in metas:
        for size, count in sample_sizes_of(meta).items():
            sizes[size] = sizes.get(size, 0) + count
        seed = meta.get("sample_seed")
        seeds.update(seed if isinstance(seed, list) else [] if seed is None else [seed])
    sizes = {k: v for k, v in sorted(sizes.items()) if v > 0}
    if len(sizes) == 1:
        (size,) = sizes
        sample_size = int(size) if size.isdigit() else size
    else:
        sample_size = "mixed" if sizes else "all"
    ordered = sorted(seeds)
    return {
        "sample_size": sample_size,
        "sample_sizes": sizes,
        "sample_seed": ordered[0] if len(ordered) == 1 else (ordered or None),
    }


SCHEMES = ("reference", "exact")  # taylor.SCHEMES
CONVENTIONS = ("reference", "skip")  # schedule.CONVENTIONS


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def check_metadata(meta: dict, num_evals: int, name: str) -> dict:
    """``meta`` of a PACT of ``num_evals`` evaluations, every field the pack reads checked: a
    ``PactFileError`` naming the field when one is of the wrong type or length (never used silently)."""

    def bad(field: str, want: str):
        raise PactFileError(f"{name}: metadata field {field!r} is {meta.get(field)!r:.80}, expected {want}; "
                            "calibrate again, or fix or remove that field")

    order = meta.get("order")
    if order is not None and not (isinstance(order, int) and not isinstance(order, bool) and 1 <= order < num_evals):
        bad("order", f"a whole number from 1 to {num_evals - 1}")
    if meta.get("scheme") is not None and meta["scheme"] not in SCHEMES:
        bad("scheme", " or ".join(map(repr, SCHEMES)))
    if meta.get("convention") is not None and meta["convention"] not in CONVENTIONS:
        bad("convention", " or ".join(map(repr, CONVENTIONS)))
    for field in ("positions", "eval_sigmas"):  # the evaluations and the end: T + 1 numbers
        values = meta.get(field)
        if values is not None and not (isinstance(values, list) and len(values) == num_evals + 1
                                       and all(is_number(v) for v in values)):
            bad(field, f"a list of {num_evals + 1} numbers (one per evaluation and the end, T={num_evals})")
    windows = meta.get("windows")
    if windows is not None and not (isinstance(windows, list) and all(
            isinstance(w, list) and len(w) == 3 and all(isinstance(v, int) and v >= 0 for v in w)
            and w[0] + w[1] <= num_evals for w in windows)):
        bad("windows", f"a list of [first evaluation, evaluations, samples] within T={num_evals}")
    samples = meta.get("samples")
    if samples is not None and not (isinstance(samples, int) and not isinstance(samples, bool) and samples >= 0):
        bad("samples", "a whole number >= 0")
    return meta


def load_pact(path: str) -> tuple[PactAccumulator, dict]:
    """Read a PACT file written by ``save_pact``; ``PactFileError`` if it is missing, damaged or foreign."""
    if not os.path.isfile(path):
        raise PactFileError(f"PACT file not found: {path}")
    name = os.path.basename(path)
    try:
        with safe_open(path, framework="np") as f:
            header = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors reports truncation and bad headers in several ways
        raise PactFileError(
            f"{name} is damaged or not a safetensors file ({exc}); calibrate again or pick another PACT"
        ) from None
    if header.get("format") != FORMAT or "dpcache" not in header:
        raise PactFileError(f"{name} is a safetensors file but not a DPCache PACT (no '{FORMAT}' metadata)")
    try:
        meta = json.loads(header["dpcache"])
    except json.JSONDecodeError as exc:
        raise PactFileError(f"{name} has unreadable metadata ({exc}); calibrate again") from None
    sums, counts = tensors.get("sums"), tensors.get("counts")
    num_evals = meta.get("num_evals")
    shape = (num_evals, num_evals + 1, num_evals + 1) if isinstance(num_evals, int) and num_evals > 0 else None
    if sums is None or counts is None or shape is None or sums.shape != shape or counts.shape != shape:
        got = None if sums is None else sums.shape
        raise PactFileError(f"{name} has tensors of the wrong shape ({got}, expected {shape}); calibrate again")
    if (counts < 0).any() or not np.isfinite(sums).all():
        raise PactFileError(f"{name} holds invalid sums or counts; calibrate again")
    check_metadata(meta, num_evals, name)
    acc = PactAccumulator(num_evals)
    acc.sums = sums.astype(np.float64)
    acc.counts = counts.astype(np.int64)
    acc.samples = int(meta.get("samples", int(counts.max(initial=0))))
    if "history_sums" in tensors or "history_counts" in tensors:
        h_sums, h_counts = tensors.get("history_sums"), tensors.get("history_counts")
        try:
            if h_sums is None or h_counts is None or h_sums.shape != h_counts.shape:
                raise ValueError("history sums and counts do not match")
            if (h_counts < 0).any() or not np.isfinite(h_sums).all():
                raise ValueError("invalid history sums or counts")
            acc.add_history(h_sums.astype(np.float64), h_counts.astype(np.int64))
        except ValueError as exc:
            raise PactFileError(f"{name} has a broken history cost tensor ({exc}); calibrate again") from None
    if "trajectories" in tensors:
        try:
            acc.trajectories = check_trajectories(tensors["trajectories"], num_evals)
        except ValueError as exc:
            raise PactFileError(f"{name} has broken replay trajectories ({exc}); calibrate again") from None
    return acc, meta


def try_lock(fd: int) -> bool:
    """Take the kernel lock on ``fd`` without waiting: True when taken, False when another holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # the first byte of the file (msvcrt locks from the current position)
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK, errno.EDEADLK):
            return False
        raise


class FileLock:
    """An exclusive lock on ``<path>.lock`` between processes and threads: the kernel's (flock, or
    msvcrt.locking on Windows) on an open lock file, so a holder that crashed or was killed holds
    nothing (the system releases it at once; no stale lock to detect or take over), and two waiters
    can never both get it. The lock file names its holder (pid and host) for the timeout message.
    Where the file system has no locks, the work goes on unlocked with a warning (files are still
    written atomically: at worst one sample is lost)."""

    def __init__(self, path: str, timeout_s: float = 120.0):
        self.path = path + ".lock"
        self.timeout_s = timeout_s
        self.fd = None

    def __enter__(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        deadline = time.monotonic() + self.timeout_s
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, new_file_mode())
            try:
                locked = try_lock(fd)
            except OSError as exc:
                os.close(fd)
                log.warning("DPCache: %s cannot be locked on this file system (%s); going on without the lock",
                            self.path, exc)
                return self
            if locked and self.still_there(fd):
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
                self.fd = fd
                return self
            os.close(fd)  # held by another, or its holder removed this file as it let go: try again
            if time.monotonic() > deadline:
                raise TimeoutError(f"{os.path.basename(self.path)} is held by another process for more than "
                                   f"{self.timeout_s:.0f} s ({self.holder()}); wait for it to finish or stop it")
            time.sleep(0.05)

    def still_there(self, fd: int) -> bool:
        """True when ``fd`` is the file now at the lock's path (not one a previous holder removed)."""
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    def holder(self) -> str:
        try:
            with open(self.path) as f:
                who = json.load(f)
            return f"pid {who['pid']} on {who['host']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def __exit__(self, *exc):
        if self.fd is None:
            return False
        if fcntl is not None:  # removed while held: a waiter that opened it sees it gone and opens anew
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        else:  # Windows cannot remove an open file: it stays, empty and unlocked
            os.ftruncate(self.fd, 0)
            os.lseek(self.fd, 0, os.SEEK_SET)
            msvcrt.locking(self.fd, msvcrt.LK_UNLCK, 1)
        os.close(self.fd)
        self.fd = None
        return False


def update_pact(path: str, update: Callable[[tuple | None], tuple[PactAccumulator, dict]],
                read: Callable[[str], tuple | None] | None = None) -> dict:
    """Read, add, write a PACT file under its lock (``FileLock``): ``update(existing)`` gets the
    file's (accumulator, metadata), or None when there is none, and returns what to write; written
    atomically before the lock is let go, so two processes adding samples never lose one. ``read``:
    how the caller reads the file (DPCache Calibrate's reset starts afresh), default ``load_pact``.
    Used by DPCache Calibrate and the automatic mode. Returns the metadata written."""
    with FileLock(path):
        if read is not None:
            existing = read(path)
        else:
            existing = load_pact(path) if os.path.exists(path) else None
        acc, meta = update(existing)
        return save_pact(path, acc, meta)


# The only globals numpy needs to rebuild a pickled array; anything else is refused unexecuted.
ALLOWED_PICKLE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how protocol 0-2 pickles carry an array's raw bytes (str -> bytes only)
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: a reference PACT file may contain numpy arrays only"
            )
        return super().find_class(module, name)


def check_cost_tensor(obj, path: str) -> np.ndarray:
    """``obj`` as a float64 (T, T+1, T+1) cost tensor; ``PactFileError`` naming ``path`` otherwise."""
    if not isinstance(obj, np.ndarray) or obj.ndim != 3 or obj.shape[1:] != (obj.shape[0] + 1,) * 2:
        raise PactFileError(f"{os.path.basename(path)} does not hold a (T, T+1, T+1) cost tensor")
    if obj.dtype.kind not in "fiu":
        raise PactFileError(f"{os.path.basename(path)} holds {obj.dtype} values, not numbers")
    return obj.astype(np.float64)


def import_reference_npy(path: str) -> np.ndarray:
    """Read a cost tensor saved with ``numpy.save`` (pickled object arrays are refused, never loaded)."""
    try:
        obj = np.load(path, allow_pickle=False)
    except ValueError as exc:  # numpy's refusal of object arrays, and malformed headers
        raise PactFileError(f"{os.path.basename(path)} is not a plain numeric .npy array ({exc})") from None
    except OSError as exc:
        raise PactFileError(f"cannot read {path} ({exc})") from None
    return check_cost_tensor(obj, path)


def import_reference(path: str) -> np.ndarray:
    """A reference cost tensor from ``.pkl`` (restricted unpickler) or ``.npy`` (no pickle at all)."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        return import_reference_npy(path)
    if ext == ".pkl":
        return import_reference_pkl(path)
    raise PactFileError(f"{os.path.basename(path)}: expected a .pkl or .npy cost tensor")


def import_reference_pkl(path: str) -> np.ndarray:
    """Read the reference implementation's ``.pkl`` cost tensor(s) without executing any code.

    A file holding several pickled samples (the reference's pre-merge format) gives their mean.
    """
    with open(path, "rb") as f:
        data = f.read()
    stream = io.BytesIO(data)
    arrays = []
    while stream.tell() < len(data):
        try:
            obj = NumpyOnlyUnpickler(stream).load()
        except pickle.UnpicklingError as exc:
            raise PactFileError(f"{os.path.basename(path)}: {exc}") from None
        except Exception as exc:
            raise PactFileError(f"{os.path.basename(path)} is not a readable pickle of arrays ({exc})") from None
        arrays.append(check_cost_tensor(obj, path))
    if not arrays:
        raise PactFileError(f"{os.path.basename(path)} is empty")
    if len(arrays) == 1:
        return arrays[0]
    acc = PactAccumulator(arrays[0].shape[0])
    for cost in arrays:
        acc.add(cost)
    return acc.mean()
