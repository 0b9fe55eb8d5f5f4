"""DPCache Calibrate: record every evaluation of a sampling run and add one sample to a PACT file."""
from __future__ import annotations

import logging
import os
import re

try:  # inside ComfyUI the pack is a package; in the CPU tests the repo root is on sys.path
    from ..dpcache_core import PactAccumulator, PactFileError, history_fits, load_pact
    from ..dpcache_core import windows
    from ..dpcache_core.replay import replay_sample
    from ..dpcache_core.pact import default_max_gap
    from ..dpcache_core.replan import RunShape, joint_trajectory
    from ..dpcache_core.runtime import DEFAULT_SAMPLE_SIZE
    from ..dpcache_core.store import combine_sampling, update_pact
    from ..dpcache_core.transfer import positions_from_sigmas, spread_ties
    from ..dpcache_core.settings import sample_record, sigmas_hash as settings_sigmas_hash, with_record
except ImportError:  # pragma: no cover - depends on how the pack is imported
    from dpcache_core import PactAccumulator, PactFileError, history_fits, load_pact
    from dpcache_core import windows
    from dpcache_core.replay import replay_sample
    from dpcache_core.pact import default_max_gap
    from dpcache_core.replan import RunShape, joint_trajectory
    from dpcache_core.runtime import DEFAULT_SAMPLE_SIZE
    from dpcache_core.store import combine_sampling, update_pact
    from dpcache_core.transfer import positions_from_sigmas, spread_ties
    from dpcache_core.settings import sample_record, sigmas_hash as settings_sigmas_hash, with_record

from . import ui
from .check_hook import copy_conds, run_checks
from .run_state import CalibrateRun
from .sampler_counts import expected_evaluations, is_rectified_flow, sampler_name
from .sampling_hooks import failure_text, guess_scheduler, is_cancel, refuse_context_windows, resolution_of, run_shape, sample_with_run, sigma_table

log = logging.getLogger("dpcache")

CHECK_RUNS = 8  # DPCache Calibrate's default: the first 8 recorded runs of a file are followed by check runs (chosen by
# leave-one-model-out against 4: BENCHMARKS.md section 14)
PACT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def pact_file_name(name: str) -> str:
    """The file name for a PACT typed by the user; only a plain name, never a path."""
    name = (name or "").strip()
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not PACT_NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"pact_name {name!r} is not a plain file name: use letters, digits, '.', '_' and '-' "
            "(for example flux_dev_euler_50); it is saved as models/dpcache/<name>.safetensors"
        )
    return name + ".safetensors"


def file_metadata(run_metadata: dict, existing, order: int, has_history: bool, whole_run: bool = True) -> dict:
    """The metadata to write: the run's, with the file's planning convention. A new file plans
    skip-only ("skip"; history-exact at order >= 2) when its costs support it; a file that already
    exists keeps the convention it was made with (none recorded: "reference", as planned before);
    a file of partial-run windows (planned jointly) keeps the reference convention."""
    meta = dict(run_metadata)
    if existing is not None:
        meta.pop("convention", None)
        if "convention" in existing[1]:
            meta["convention"] = existing[1]["convention"]
    else:
        meta["convention"] = "skip" if whole_run and (order == 1 or has_history) else "reference"
    return meta


def trajectory_metadata(run: CalibrateRun) -> dict:
    """Per-evaluation sigmas (and the final one), and their normalised positions when the model
    has a sigma table: what lets the PACT be transferred to other step counts and samplers."""
    sigmas = run.sigmas + [run.final_sigma]
    if any(s != s for s in sigmas):  # NaN: an evaluation's sigma was not seen
        return {}
    meta = {"eval_sigmas": [round(s, 8) for s in sigmas]}
    if run.sigma_table is not None:
        meta["positions"] = [round(float(p), 8) for p in spread_ties(positions_from_sigmas(sigmas, run.sigma_table))]
    return meta


def run_window(shape: RunShape | None):
    """(offset, total, num_evals) when a sampling run is a window of a longer trajectory (a
    KSamplerAdvanced slice, e.g. one Wan2.2 A14B expert), placed like the run-time planner places it
    (``replan.joint_trajectory``); None for a whole run or an evaluation count not known up front."""
    if shape is None or not shape.partial:
        return None
    joint = joint_trajectory(shape, 1)
    return joint.offset, joint.total, shape.num_evals


def recorded_window(run) -> tuple | None:
    """``run_window`` of a finished calibration run, from the sigma of each evaluation it recorded."""
    sigmas = run.sigmas + [run.final_sigma]
    if run.sigma_table is None or not run.sigmas or any(s != s for s in sigmas):
        return None
    positions = positions_from_sigmas(sigmas, run.sigma_table)
    return run_window(RunShape(len(run.sigmas), tuple(spread_ties(positions[:-1])), float(positions[-1])))


def kept_text(size) -> str:
    """What calibration keeps of the cache point (``TrajectoryRecorder.sample_description``): a sample
    of S elements, or all of them (sample_size 0, or S at least the cache point's size)."""
    return "every cache-point element" if size == "all" else f"{size} sampled cache-point elements per stream"


def automatic_pact_name(family: str, sampler: str | None, steps: int, scheduler: str | None = None,
                        sigmas_digest: str = "") -> str:
    """The PACT name when pact_name is left empty: model family, sampler, scheduler and step count
    (wan_uni_pc_simple_30); sigmas no named scheduler makes are named by their hash (flux_euler_sig1a2b3c_20)."""
    sched = scheduler or f"sig{sigmas_digest[:6]}"
    return f"{family}_{sampler or 'sampler'}_{sched}_{steps}"


def sigmas_mismatch(name: str, meta: dict, digest: str | None, scheduler: str | None, count: int | None = None) -> str | None:
    """Why a run must not add to a PACT of other sigmas (another scheduler, shift or denoise), or None.
    Files of partial-run windows and files written before sigmas were recorded are not checked."""
    if meta.get("windows") or digest is None:
        return None
    have = meta.get("sigmas_hash")
    if have is None and meta.get("eval_sigmas") and len(meta["eval_sigmas"]) == count:  # one evaluation per step
        have = settings_sigmas_hash(meta["eval_sigmas"])
    if have is None or have == digest:
        return None
    return (f"PACT '{name}' was calibrated on other sigmas (scheduler {meta.get('scheduler') or 'unknown'}) than this "
            f"run's (scheduler {scheduler or 'not a named one'}); adding this sample would mix the costs of two "
            "trajectories. Pick a new pact_name on DPCache Calibrate (or leave it empty: automatic names include the "
            "scheduler), or set reset to start the file afresh")


def calibration_run(family: str, guider, args, sample_size: int, expected_evals: int | None) -> CalibrateRun:
    """A run that records every evaluation (DPCache Calibrate, and the automatic mode's calibration
    runs), with what the PACT's metadata takes from the sampling run (OUTER_SAMPLE's ``args``): the
    model's sigma table, the final sigma, the seed and the resolution."""
    run = CalibrateRun(family, sample_size=sample_size, expected_evals=expected_evals)
    run.sigma_table = sigma_table(guider)
    run.final_sigma = float(args[3].reshape(-1)[-1])
    run.seed = args[7] if len(args) > 7 else None
    run.resolution = resolution_of(args[1])
    return run


class CalibrateHook:
    """Per-node config of DPCache Calibrate; records every run and adds one sample to the PACT file.

    An empty ``name`` is decided at the start of each run from the model family, the sampler and
    the step count, so one node can calibrate several settings into separate files.
    """

    def __init__(self, family: str, folder: str, name: str, order: int, reset: bool, node_id=None,
                 sample_size: int = DEFAULT_SAMPLE_SIZE, check_runs: int = CHECK_RUNS):
        if sample_size < 0:
            raise ValueError(f"sample_size must be >= 0 (0 keeps every element), got {sample_size}")
        if check_runs < 0:
            raise ValueError(f"check_runs must be >= 0 (0 samples no check run), got {check_runs}")
        self.check_runs = int(check_runs)
        self.sample_size = int(sample_size)
        self.family = family
        self.folder = folder
        self.name = (name or "").strip()
        self.path = os.path.join(folder, pact_file_name(self.name)) if self.name else None  # None: named per run
        self.order = int(order)
        self.node_id = node_id
        # Mutable on purpose, shared by every run of this node output: the first finished run
        # after the node executed with reset=True starts the file afresh, later ones accumulate.
        self.pending_reset = [bool(reset)]

    def __deepcopy__(self, memo):
        return self

    def describe_target(self) -> str:
        if self.path:
            return self.path
        return os.path.join(self.folder, f"{self.family}_<sampler>_<steps>.safetensors (named when sampling starts)")

    def mismatch(self, path: str, meta: dict, num_evals: int | None) -> str | None:
        have = (meta.get("model_family"), meta.get("order"), meta.get("num_evals"))
        want = (self.family, self.order, num_evals if num_evals is not None else meta.get("num_evals"))
        if have[0] in (None, want[0]) and have[1] == want[1] and have[2] == want[2]:
            return None
        return (
            f"PACT '{os.path.basename(path)}' holds {meta.get('samples', '?')} samples for model family "
            f"{have[0]}, T={have[2]} evaluations, order {have[1]}; this run is {want[0]}, T={want[2]}, order {want[1]}. "
            "Pick a new pact_name on DPCache Calibrate, or set reset to start the file afresh"
        )

    def load_existing(self, path: str, window=None):
        """The PACT file's (accumulator, metadata), or None to start afresh.

        With reset pending, a full run starts afresh; a window run (one expert of several) keeps the
        other windows and drops only its own, so two Calibrate nodes with reset can share one file."""
        if not os.path.exists(path) or (self.pending_reset[0] and window is None):
            return None
        try:
            acc, meta = load_pact(path)
        except PactFileError as exc:
            if self.pending_reset[0]:
                return None
            raise PactFileError(f"{exc} (or set reset on DPCache Calibrate to overwrite it)") from None
        if self.pending_reset[0]:
            if self.mismatch(path, meta, acc.num_evals if window is None else window[1]) or not meta.get("windows"):
                return None
            meta = dict(meta, windows=windows.drop_window(acc, meta.get("windows"), window[0], window[2]))
        return acc, meta

    def start(self, guider, args) -> CalibrateRun:
        sampler, sigmas = args[2], args[3]
        refuse_context_windows(guider, "DPCache Calibrate")
        window = run_window(run_shape(guider, sampler, sigmas))
        steps = int(sigmas.shape[-1]) - 1 if window is None else window[1]
        scheduler = guess_scheduler(guider, sigmas)
        digest = settings_sigmas_hash(sigmas.detach().float().cpu().reshape(-1).tolist())
        path = self.path or os.path.join(
            self.folder, pact_file_name(automatic_pact_name(self.family, sampler_name(sampler), steps, scheduler, digest)))
        existing = self.load_existing(path, window)
        if existing is not None:
            count = window[1] if window else expected_evaluations(sampler, sigmas, is_rectified_flow(guider.model_patcher))
            problem = self.mismatch(path, existing[1], count) or sigmas_mismatch(
                os.path.basename(path), existing[1], None if window else digest, scheduler, int(sigmas.numel()))
            if problem:
                raise PactFileError(problem)
        expected = window[2] if window else expected_evaluations(sampler, sigmas, is_rectified_flow(guider.model_patcher))
        run = calibration_run(self.family, guider, args, self.sample_size, expected)
        run.path = path
        run.window = window
        run.metadata = {
            "model_family": self.family,
            "order": self.order,
            "scheme": "reference",
            "sampler": sampler_name(sampler),
            "scheduler": scheduler,
            "resolution": run.resolution,
            "steps": steps,
        }
        if window is None:
            run.metadata["sigmas_hash"] = digest
        run.record = sample_record(run.resolution, run.seed, run.metadata["sampler"], scheduler)
        where = "" if window is None else f" (evaluations {window[0]}..{window[0] + window[2] - 1} of a T={window[1]} trajectory)"
        log.info("DPCache Calibrate: recording the cache point at every evaluation for %s%s", os.path.basename(path), where)
        run.announce = lambda size: log.info("DPCache Calibrate: keeping %s", kept_text(size))
        return run

    def refuse_other_file(self, run: CalibrateRun, existing, total: int) -> None:
        """PactFileError when the file ``existing`` (accumulator, metadata) is of another model, T, order or sigmas."""
        if existing is None:
            return
        problem = self.mismatch(run.path, existing[1], total) or sigmas_mismatch(
            os.path.basename(run.path), existing[1], run.metadata.get("sigmas_hash"), run.metadata.get("scheduler"),
            len(run.sigmas) + 1)
        if problem:
            raise PactFileError(problem)

    def finish(self, run: CalibrateRun, ok: bool) -> None:
        name = os.path.basename(run.path)
        if not ok:
            log.info("DPCache Calibrate: run stopped; nothing added to %s", name)
            return
        num_evals = run.evaluations
        if num_evals < self.order + 1:
            raise ValueError(f"a PACT of order {self.order} needs at least {self.order + 1} evaluations; this run made {num_evals}")
        window = run.window
        if window is None or window[2] != num_evals:  # count not known up front: place it from the recorded sigmas
            window = recorded_window(run)
        total = num_evals if window is None else window[1]
        self.refuse_other_file(run, self.load_existing(run.path, window), total)  # before the sample is built
        log.info("DPCache Calibrate: building the PACT sample (%d evaluations)", num_evals)
        sample = run.recorder.build_sample(self.order, "reference", progress=ui.progress_bar(num_evals, self.node_id),
                                           max_anchor_gap=default_max_gap(total))
        history = None
        if window is None and self.order >= 2 and history_fits(num_evals, self.order):  # the history-exact cost (issue 11)
            log.info("DPCache Calibrate: building the order-%d history cost tensor", self.order)
            history = run.recorder.build_history_sample(self.order, "reference", progress=ui.progress_bar(num_evals, self.node_id))
        if window is not None:
            sample = windows.embed_window(sample, window[0], total)
        size = run.recorder.sample_description()

        def add(existing):
            """The file with this sample added: run under the file's lock on what is there now (another
            process may have added a sample since the check above)."""
            self.refuse_other_file(run, existing, total)
            acc, old_meta = existing if existing is not None else (PactAccumulator(total), {})
            meta = dict(run.metadata, **trajectory_metadata(run))
            if window is not None:
                if existing is not None and not old_meta.get("windows"):
                    raise PactFileError(
                        f"PACT '{name}' was calibrated on whole sampling runs; this run samples only evaluations "
                        f"{window[0]}..{window[0] + num_evals - 1} of T={total} (a KSamplerAdvanced window). "
                        "Pick a new pact_name on DPCache Calibrate, or set reset"
                    )
                meta["windows"] = windows.add_window(old_meta.get("windows"), window[0], num_evals)
                meta.pop("eval_sigmas", None)  # this window's only; positions below cover the whole trajectory
                meta["positions"] = windows.window_positions(old_meta.get("positions"), meta.get("positions"), window)
            elif old_meta.get("windows"):
                raise PactFileError(
                    f"PACT '{name}' holds windows of partial sampling runs (e.g. two Wan2.2 experts); this run samples "
                    "the whole trajectory. Pick a new pact_name on DPCache Calibrate, or set reset"
                )
            if old_meta.get("forecaster_checks"):
                meta["forecaster_checks"] = old_meta["forecaster_checks"]  # the check runs stay with the file
            acc.add(sample, history=history, trajectories=None if window is not None else replay_sample(run.recorder))
            if window is not None:
                acc.samples = sum(w[2] for w in meta["windows"])
            this = {"samples": 1, "sample_size": size, "sample_seed": None if size == "all" else run.recorder.seed}
            meta.update(combine_sampling([old_meta, this]))
            meta.update(with_record(old_meta, run.record))  # per-sample metadata kept as a list, never overwritten
            return acc, file_metadata(meta, existing, self.order, history is not None, window is None)

        meta = update_pact(run.path, add, read=lambda path: self.load_existing(path, window))
        self.pending_reset[0] = False
        run.added_whole_run = window is None
        kept = kept_text(size)
        if window is None:
            line = f"{name}: sample {meta['samples']} added ({num_evals} evaluations, {kept})"
        else:
            got = ", ".join(f"{w[0]}..{w[0] + w[1] - 1}: {w[2]}" for w in meta["windows"])
            line = (f"{name}: evaluations {window[0]}..{window[0] + num_evals - 1} of T={total} added "
                    f"(samples per window {got}; {kept})")
        line += f"; {run.streams_text()}"
        dropped = run.dropped()
        if dropped:
            line += f"; left out (not recorded at every evaluation): {'; '.join(dropped)}"
        if run.report():
            line += f"; {run.report()}"
        log.info("DPCache Calibrate: %s", line)
        ui.send_text(line, self.node_id)

    def failed(self, run: CalibrateRun, exc: Exception) -> None:
        """Adding the sample failed after the sampler returned (``sample_with_run``): say so on the node."""
        fix = "; make the folder writable to calibrate" if isinstance(exc, OSError) else ""
        line = f"nothing added to {run.path}: {failure_text(exc)}. The sampler's output is returned{fix}"
        log.warning("DPCache Calibrate: %s", line)
        ui.send_text(f"DPCache Calibrate: {line}", self.node_id)

    def outer_sample(self, executor, *args, **kwargs):
        conds = copy_conds(getattr(executor.class_obj, "conds", None))  # before the sampler processes them
        started = []

        def start(guider, args):
            started.append(self.start(guider, args))
            return started[-1]

        out = sample_with_run(executor, args, kwargs, start, self.finish, self.failed)
        if self.check_runs and started and getattr(started[-1], "added_whole_run", False):
            self.check(executor, args, kwargs, conds, out, started[-1].path)
        return out

    def check(self, executor, args, kwargs, conds, out, path: str) -> None:
        """The check runs (``check_hook.run_checks``) after the output: a failure is reported, never raised."""
        try:
            line = run_checks(executor, args, kwargs, conds, out, path, self.family, self.check_runs, self.node_id)
        except Exception as exc:
            if is_cancel(exc):
                raise
            line = f"check runs not kept: {failure_text(exc)}. The sample was added and the sampler's output is returned"
            log.warning("DPCache Calibrate: %s", line)
            ui.send_text(f"DPCache Calibrate: {line}", self.node_id)
            return
        if line:
            log.info("DPCache Calibrate: %s", line)
            ui.send_text(line, self.node_id)
