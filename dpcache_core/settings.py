"""What a "setting" is for the automatic mode, and its PACT files (no ComfyUI import).

A PACT only plans the runs it describes. The automatic mode keys a file by a ``Setting``: the model
family, a cheap fingerprint of the weights as patched (``weights_fingerprint``: values spread over
every weight tensor, read once per loaded model, plus the weight patches and weight hooks with their
strengths, so a merged checkpoint, a LoRA set or a hooked LoRA changes it), the sampler, the
scheduler (a hash of the sigmas themselves), the evaluation count, the conditionings per evaluation
(cfg batching) and, for a run over a slice of the sigmas, that window. Measurements on the benchmark
model (BENCHMARKS.md, "Automatic calibration") decide whether the resolution is part of the key
(``RESOLUTION_KEYED``).

Files are ``auto_<family>_<sampler>_<scheduler>_<T>_<hash>.safetensors``: readable, and the hash of
the whole key keeps two settings apart. ``add_sample`` merges a calibration sample into a file
under its lock (``store.update_pact``: read, add, write atomically), so two runs calibrating the
same setting at once both land in one whole file.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass

import numpy as np
import torch
from safetensors import safe_open

from .pact import PactAccumulator
from .store import FORMAT, PactFileError, combine_sampling, update_pact

PREFIX = "auto_"
DEFAULT_TARGET_SPEEDUP = 3.85  # DPCache Schedule's default: K = 13 of T = 50
DEFAULT_OWN_EVALS = 50
#: Whether the resolution (token count bucket) is part of a setting. Measured on the benchmark
#: model: see BENCHMARKS.md "Automatic calibration" and docs/auto.md.
RESOLUTION_KEYED = False


def digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()


def sigmas_hash(sigmas) -> str:
    """A hash of a run's sigmas (rounded to 6 significant digits: float noise never splits a setting)."""
    values = [float(f"{float(s):.6g}") for s in np.asarray(sigmas, dtype=np.float64).reshape(-1)]
    return digest("sigmas", values)[:12]


SAMPLED_VALUES = 16  # values read per weight tensor, spread over the whole tensor
MAX_SAMPLED_TENSORS = 4096  # tensors read at most (evenly picked beyond): bounds the time on any model


def strided_values(tensor, count: int = SAMPLED_VALUES):
    """``count`` values spread evenly over the whole of ``tensor`` (a strided view: nothing else is
    read), as float32 on the tensor's device; None when they cannot be read (a meta or quantised tensor)."""
    try:
        flat = tensor.detach().reshape(-1)
        if flat.is_complex():
            flat = torch.view_as_real(flat).reshape(-1)
        return flat[:: max(1, flat.numel() // count)][:count].float()
    except Exception:
        return None


def tensors_digest(named) -> str:
    """A hash of ``named`` tensors [(name, tensor)]: every name, shape and dtype, and
    ``SAMPLED_VALUES`` values spread over each (``MAX_SAMPLED_TENSORS`` tensors read at most),
    gathered per device and copied to the CPU once. Never raises: an unreadable tensor counts by
    its name, shape and dtype."""
    named = sorted(((str(n), t) for n, t in named if isinstance(t, torch.Tensor)), key=lambda nt: nt[0])
    h = hashlib.sha256(json.dumps([(n, list(t.shape), str(t.dtype)) for n, t in named]).encode())
    step = max(1.0, len(named) / MAX_SAMPLED_TENSORS)
    picked = [named[int(i * step)] for i in range(min(len(named), MAX_SAMPLED_TENSORS))]
    by_device: dict = {}
    for name, t in picked:
        values = strided_values(t)
        if values is not None:
            by_device.setdefault(str(values.device), []).append(values)
    for device in sorted(by_device):
        try:
            h.update(device.split(":")[0].encode())
            h.update(torch.cat(by_device[device]).cpu().numpy().tobytes())
        except Exception:  # a device that cannot copy out (meta): its shapes are hashed above
            pass
    return h.hexdigest()[:16]


def describe_patch(obj, depth: int = 0):
    """A JSON-able description of a weight patch (LoRA, diff, set, an adapter object, a function, ...):
    numbers and strings as they are, a tensor as its shape, dtype and ``SAMPLED_VALUES`` values spread
    over it, an object as its type and its ``weights``. Never raises."""
    try:
        if obj is None or isinstance(obj, (bool, int, str)):
            return obj
        if isinstance(obj, float):
            return round(obj, 9)
        if isinstance(obj, torch.Tensor):
            values = strided_values(obj)
            try:
                values = None if values is None else [round(float(v), 6) for v in values.cpu()]
            except Exception:
                values = None
            return ["tensor", list(obj.shape), str(obj.dtype), values]
        if depth > 6:
            return type(obj).__name__
        if isinstance(obj, (list, tuple)):
            return [describe_patch(x, depth + 1) for x in obj]
        if isinstance(obj, dict):
            return sorted([str(k), describe_patch(v, depth + 1)] for k, v in obj.items())
        if hasattr(obj, "weights"):  # a LoRA adapter object (comfy.weight_adapter): its type and tensors
            return [type(obj).__name__, describe_patch(obj.weights, depth + 1)]
        return getattr(obj, "__qualname__", type(obj).__name__)  # a function or another object: its name
    except Exception:
        return type(obj).__name__


def weights_fingerprint(weights: str, patches: dict | None = None, hook_patches: dict | None = None) -> str:
    """The fingerprint of the weights as the run uses them: ``weights``, a digest of the weights as
    loaded (``tensors_digest``), ``patches``, the patcher's weight patches {key: [entries]} (a LoRA
    set and its strengths), and ``hook_patches``, the weight hooks registered for this run (Create
    Hook LoRA: {hook: {key: [entries]}}; the hooks' identities do not count, their content does)."""
    hooks = sorted(json.dumps(describe_patch(p), sort_keys=True) for p in (hook_patches or {}).values())
    parts = [weights, describe_patch(patches or {}), hooks]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def combine_records(metas: list[dict]) -> dict:
    """The per-sample fields of the union of files with ``metas``: ``sample_meta``, every sample's
    record in order, and ``resolution``, the one value or the distinct ones (a file written before
    records were kept contributes its single ``resolution``)."""
    records, resolutions = [], []
    for meta in metas:
        own = list(meta.get("sample_meta") or [])
        records += own
        if own:
            resolutions += [r.get("resolution") for r in own]
        elif meta.get("resolution"):
            old = meta["resolution"]
            resolutions += old if isinstance(old, list) else [old]
    return {"sample_meta": records, "resolution": distinct(resolutions)}


def with_record(old_meta: dict, record: dict) -> dict:
    """The per-sample fields of a file after adding ``record`` (see ``combine_records``)."""
    return combine_records([old_meta, {"sample_meta": [record]}])


def add_sample(path: str, setting: Setting, sample: np.ndarray, metadata: dict, record: dict,
               history: np.ndarray | None = None, trajectories: np.ndarray | None = None) -> dict:
    """Add one calibration sample of ``setting`` to its file (``store.update_pact``: under the file's
    lock, read what is there, since another process may have written, check it is the same setting,
    add, write atomically). A damaged file is refused with its name. Returns the metadata written."""

    def add(existing):
        if existing is not None:
            acc, old = existing
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
        return acc, meta

    return update_pact(path, add)
