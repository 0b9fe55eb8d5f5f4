"""What a "setting" is for the automatic mode, and its PACT files (no ComfyUI import).

A PACT only plans the runs it describes. The automatic mode keys a file by a ``Setting``: the model
family, a cheap fingerprint of the weights as patched (``weights_fingerprint``: a few fixed slices
of a few parameters plus the patch keys and strengths, so a LoRA set changes it), the sampler, the
scheduler (a hash of the sigmas themselves), the evaluation count, the conditionings per evaluation
(cfg batching) and, for a run over a slice of the sigmas, that window. Measurements on the benchmark
model (BENCHMARKS.md, "Automatic calibration") decide whether the resolution is part of the key
(``RESOLUTION_KEYED``).

Files are ``auto_<family>_<sampler>_<scheduler>_<T>_<hash>.safetensors``: readable, and the hash of
the whole key keeps two settings apart. ``add_sample`` merges a calibration sample into a file
under a lock file (read, add, write atomically), so two runs calibrating the same setting at once
both land in one whole file.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass

import numpy as np
from safetensors import safe_open

from .pact import PactAccumulator
from .store import FORMAT, PactFileError, combine_sampling, load_pact, save_pact

PREFIX = "auto_"
DEFAULT_TARGET_SPEEDUP = 3.85  # DPCache Schedule's default: K = 13 of T = 50
DEFAULT_OWN_EVALS = 50
#: Whether the resolution (token count bucket) is part of a setting. Measured on the benchmark
#: model: see BENCHMARKS.md "Automatic calibration" and docs/auto.md.
RESOLUTION_KEYED = False
LOCK_STALE_S = 600.0  # a lock file older than this is left over from a crashed process


def digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()


def sigmas_hash(sigmas) -> str:
    """A hash of a run's sigmas (rounded to 6 significant digits: float noise never splits a setting)."""
    values = [float(f"{float(s):.6g}") for s in np.asarray(sigmas, dtype=np.float64).reshape(-1)]
    return digest("sigmas", values)[:12]


def weights_fingerprint(slices: dict[str, np.ndarray], shapes: list, patches: list) -> str:
    """A cheap fingerprint of the weights as patched.

    ``slices``: a few fixed slices of a few parameters (name -> small array); ``shapes``: (name,
    shape) of every parameter (cheap: no values); ``patches``: (key, strengths, digest of the patch
    data) of every patched weight (a LoRA set and its strengths). Never reads all the weights."""
    parts = [("shapes", [(str(n), list(map(int, s))) for n, s in shapes]), ("patches", sorted(patches, key=str))]
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for name in sorted(slices):
        a = np.ascontiguousarray(np.asarray(slices[name], dtype=np.float32))
        h.update(name.encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def resolution_bucket(tokens: int) -> str:
    """Token counts (latent positions x frames) grouped in factors of 2: 4096 and 5000 share one bucket."""
    if tokens <= 0:
        return ""
    return f"tok{2 ** int(round(math.log2(tokens)))}"


def safe_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", str(text or "none")).strip("-")[:32] or "none"


@dataclass(frozen=True)
class Setting:
    """The key of an automatic PACT file."""

    family: str
    weights: str
    sampler: str
    scheduler: str  # a scheduler name, or "custom" for sigmas no named scheduler makes
    sigmas: str  # sigmas_hash of the run's sigmas
    num_evals: int
    conds: int  # conditionings per evaluation: 1 (cfg 1) or 2 (cond and uncond)
    window: str = ""  # "0.00-0.50" for a run over a slice of the sigmas (a KSamplerAdvanced window)
    bucket: str = ""  # resolution bucket when RESOLUTION_KEYED

    @property
    def key(self) -> str:
        return digest(asdict(self))[:10]

    @property
    def model(self) -> tuple:
        """What must match for a PACT to be transferred to this setting: same model, same cfg
        batching, same window, same bucket; only the sampler, scheduler or count differ."""
        return (self.family, self.weights, self.conds, self.window, self.bucket)

    def file_name(self) -> str:
        parts = [self.family, self.sampler, self.scheduler, str(self.num_evals)]
        return PREFIX + "_".join(safe_part(p) for p in parts) + f"_{self.key}.safetensors"

    def describe(self) -> str:
        extra = f", window {self.window}" if self.window else ""
        extra += f", {self.bucket}" if self.bucket else ""
        cfg = "cond and uncond" if self.conds > 1 else "cond only"
        return (f"{self.family} (weights {self.weights[:8]}), {self.sampler}/{self.scheduler}, T={self.num_evals}, "
                f"{cfg}{extra}")

    def as_meta(self) -> dict:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta) -> "Setting | None":
        try:
            return cls(**{k: meta[k] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError):
            return None


def read_metadata(path: str) -> dict:
    """A PACT file's metadata only (cheap: no tensors); PactFileError when it is damaged or foreign."""
    try:
        with safe_open(path, framework="np") as f:
            header = f.metadata() or {}
        if header.get("format") != FORMAT:
            raise ValueError("no DPCache metadata")
        return json.loads(header["dpcache"])
    except Exception as exc:
        raise PactFileError(f"{os.path.basename(path)} is damaged or not a DPCache PACT ({exc})") from None


@dataclass(frozen=True)
class Found:
    """A PACT file for a setting: ``exact`` (calibrated at this setting) or a transfer source."""

    path: str
    meta: dict
    exact: bool

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def nearest(folder: str, setting: Setting, skip: set | None = None) -> Found | None:
    """The file of ``setting`` when there is one, else the nearest file of the same model (same
    family, weights, cfg batching, window and bucket) to transfer from: the same sampler and
    scheduler first, then the closest evaluation count. Damaged files are skipped here (the exact
    one is reported by the caller when it cannot be read)."""
    if not os.path.isdir(folder):
        return None
    best, best_rank = None, None
    for name in sorted(os.listdir(folder)):
        if not (name.startswith(PREFIX) and name.endswith(".safetensors")) or name in (skip or ()):
            continue
        path = os.path.join(folder, name)
        try:
            meta = read_metadata(path)
        except PactFileError:
            continue
        other = Setting.from_meta(meta.get("setting") or {})
        if other is None or other.model != setting.model:
            continue
        if other == setting:
            return Found(path, meta, True)
        rank = ((other.sampler, other.scheduler) != (setting.sampler, setting.scheduler),
                abs(math.log(other.num_evals / setting.num_evals)), name)
        if best_rank is None or rank < best_rank:
            best, best_rank = Found(path, meta, False), rank
    return best


class FileLock:
    """An exclusive lock file ``<path>.lock`` (O_CREAT | O_EXCL): works between processes on one
    machine and on most network file systems. A lock older than ``stale_s`` is left over from a
    crashed process and is taken over."""

    def __init__(self, path: str, timeout_s: float = 120.0, stale_s: float = LOCK_STALE_S):
        self.path = path + ".lock"
        self.timeout_s, self.stale_s = timeout_s, stale_s
        self.fd = None

    def __enter__(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                self.fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
                os.write(self.fd, str(os.getpid()).encode())
                return self
            except FileExistsError:
                try:
                    if time.time() - os.stat(self.path).st_mtime > self.stale_s:
                        os.unlink(self.path)
                        continue
                except FileNotFoundError:
                    continue
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{os.path.basename(self.path)} is held by another process for more than {self.timeout_s:.0f} s; "
                        "if no ComfyUI is calibrating, delete it") from None
                time.sleep(0.05)

    def __exit__(self, *exc):
        os.close(self.fd)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        return False


def sample_record(resolution: str, seed, sampler: str, scheduler: str, **extra) -> dict:
    """The per-sample metadata a file keeps as a list (never overwritten by the next run)."""
    rec = {"resolution": resolution, "seed": None if seed is None else int(seed), "sampler": sampler,
           "scheduler": scheduler}
    rec.update({k: v for k, v in extra.items() if v is not None})
    return rec


def distinct(values) -> object:
    """One value when all agree, else the sorted distinct ones (the "resolution" field of a file)."""
    out = sorted({json.dumps(v, sort_keys=True) for v in values})
    vals = [json.loads(v) for v in out]
    return vals[0] if len(vals) == 1 else vals


def with_record(old_meta: dict, record: dict) -> dict:
    """The per-sample fields of a file after adding ``record``: ``sample_meta``, the list of every
    sample's record, and ``resolution``, the one value or the distinct ones (a file written before
    records were kept contributes its single ``resolution``)."""
    records = list(old_meta.get("sample_meta") or []) + [record]
    resolutions = [r.get("resolution") for r in records]
    if old_meta.get("resolution") and not old_meta.get("sample_meta"):
        old = old_meta["resolution"]
        resolutions = (old if isinstance(old, list) else [old]) + resolutions
    return {"sample_meta": records, "resolution": distinct(resolutions)}


def add_sample(path: str, setting: Setting, sample: np.ndarray, metadata: dict, record: dict,
               history: np.ndarray | None = None, trajectories: np.ndarray | None = None) -> dict:
    """Add one calibration sample of ``setting`` to its file, under the file's lock: read what is
    there (another process may have written since), check it is the same setting, add, write
    atomically. A damaged file is refused with its name. Returns the metadata written."""
    with FileLock(path):
        if os.path.exists(path):
            acc, old = load_pact(path)
            if Setting.from_meta(old.get("setting") or {}) != setting:
                raise PactFileError(
                    f"{os.path.basename(path)} holds another setting ({old.get('setting')}); it is not added to. "
                    "Move the file away to calibrate this setting")
        else:
            acc, old = PactAccumulator(setting.num_evals), {}
        acc.add(sample, history=history, trajectories=trajectories)
        size = metadata.get("sample_size", "all")
        this = {"samples": 1, "sample_size": size, "sample_seed": metadata.get("sample_seed")}
        meta = dict(metadata, setting=setting.as_meta(), **with_record(old, record))
        meta.update(combine_sampling([old, this] if old else [this]))
        if "convention" in old:
            meta["convention"] = old["convention"]
        return save_pact(path, acc, meta)
