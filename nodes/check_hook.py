"""DPCache Calibrate's check runs (``dpcache_core.check_runs``): after a recorded run, sample the same
noise and conditioning again with each forecaster at a few K and keep how close each came."""
from __future__ import annotations

import logging

try:  # inside ComfyUI the pack is a package; in the CPU tests the repo root is on sys.path
    from ..dpcache_core import Schedule, check_runs, choose, load_pact
    from ..dpcache_core.store import update_pact
except ImportError:  # pragma: no cover - depends on how the pack is imported
    from dpcache_core import Schedule, check_runs, choose, load_pact
    from dpcache_core.store import update_pact

from . import memory, ui
from .run_state import ApplyRun
from .sampler_counts import sampler_name
from .sampling_hooks import options_with_run

log = logging.getLogger("dpcache")

FIRST_FULL_STEPS = 3  # DPCache Schedule's default


def copy_conds(conds):
    """A copy of the guider's conditioning as the sampler starts (each entry's dict copied, like
    ComfyUI's guider copies its original conds for every sampling run); None when it has none."""
    if not isinstance(conds, dict):
        return None
    return {k: [dict(c) if isinstance(c, dict) else c for c in v] for k, v in conds.items()}


def quiet_args(args, kwargs):
    """OUTER_SAMPLE's arguments without the preview callback and with the sampler's own bar off."""
    args = list(args)
    if len(args) > 5:
        args[5] = None
    if len(args) > 6:
        args[6] = True
    kwargs = dict(kwargs)
    if "callback" in kwargs:
        kwargs["callback"] = None
    if "disable_pbar" in kwargs:
        kwargs["disable_pbar"] = True
    return args, kwargs


def planned_checks(acc, meta: dict) -> list[tuple[int, str, object]]:
    """(K, label, candidate) to sample at each K of ``check_ks``, planned on the file as it is now:
    each forecaster on its replay-best key set (label: the forecaster), and Taylor 2 and spectral on
    the key set planned on the history-exact cost of the recorded runs (label:
    ``check_runs.HISTORY_PLAN`` added; sampled once when it is the same plan as another label's)."""
    plans = []
    for k in check_runs.check_ks(acc.num_evals, FIRST_FULL_STEPS):
        try:
            choice = choose.replay_choice(acc, meta, k, FIRST_FULL_STEPS, 0, checks=False)
        except ValueError:  # no finite plan at this K
            continue
        if choice is None:
            return []
        here = []
        for name in choose.SPEED_ORDER:
            of_name = [c for c in choice.candidates if c.name == name]
            if of_name:
                here.append((k, name, min(of_name, key=lambda c: c.error)))
        history = choose.trajectory_history_plan(acc.trajectories, k, FIRST_FULL_STEPS)
        for name in ("taylor 2", "spectral") if history is not None else ():
            here.append((k, name + check_runs.HISTORY_PLAN, choose.Candidate(
                name, tuple(history), choose.TRAJECTORY_HISTORY, 0.0)))
        plans += here
    return plans


def sample_checks(executor, args, kwargs, conds, reference, family: str, num_evals: int, plans,
                  node_id=None) -> dict:
    """{K: {label: PSNR dB of the final latent against ``reference``}}: each plan sampled with the
    cache, the guider's conditioning reset to ``conds`` before each run. A forecaster whose cache
    would not fit the free GPU memory (``memory.fit_run``) is left out: no result for its labels."""
    guider = executor.class_obj
    original = guider.model_options
    args, kwargs = quiet_args(args, kwargs)
    total = sum({(c.name, tuple(c.keys)): k for k, _, c in plans}.values())  # distinct plans
    bar = ui.progress_bar(total, node_id)
    done, results, sampled = 0, {}, {}
    for k, name, cand in plans:
        plan = (cand.name, tuple(cand.keys))
        if plan in sampled:  # the same forecaster on the same keys: the same run
            results.setdefault(k, {})[name] = sampled[plan]
            continue
        schedule = Schedule(tuple(cand.keys), num_evals, model_family=family, order=cand.order, source="check",
                            first_full_steps=FIRST_FULL_STEPS, predictor=cand.predictor)
        fitted, fit = memory.fit_run(schedule, guider, args[0].shape)
        if (fitted.predictor, fitted.order) != (schedule.predictor, schedule.order):
            done += k
            continue
        run = ApplyRun(family, schedule, False, sampler_name(args[2]), memory=fit)
        if conds is not None:
            guider.conds = copy_conds(conds)
        try:
            guider.model_options = options_with_run(original, run)
            out = executor(*args, **kwargs)
        finally:
            guider.model_options = original
            run.close()
        results.setdefault(k, {})[name] = sampled[plan] = check_runs.latent_psnr(out, reference)
        done += k
        if bar is not None:
            bar(done, total)
    return results


def results_text(results: dict) -> str:
    """One line: each K's forecasters and their PSNR."""
    return "; ".join(f"K={k}: " + ", ".join(f"{choose.label(n)} {db:.1f}" for n, db in row.items())
                     for k, row in results.items())


def run_checks(executor, args, kwargs, conds, reference, path: str, family: str, wanted_runs: int,
               node_id=None) -> str | None:
    """The check runs after a recorded run of the PACT file at ``path`` while it has fewer than
    ``wanted_runs`` of them; adds their results to the file's metadata and returns the line to show
    (None when no check was due: enough runs, no replay trajectories, or partial-run windows)."""
    acc, meta = load_pact(path)
    if check_runs.runs_of(meta) >= wanted_runs or getattr(acc, "trajectories", None) is None or meta.get("windows"):
        return None
    plans = planned_checks(acc, meta)
    if not plans:
        return None
    ks = sorted({k for k, _, _ in plans}, reverse=True)
    log.info("DPCache Calibrate: check runs: each forecaster sampled with the cache at K = %s of %d",
             ", ".join(map(str, ks)), acc.num_evals)
    results = sample_checks(executor, args, kwargs, conds, reference, family, acc.num_evals, plans, node_id)

    keys = {}
    for k, name, cand in plans:
        if name in results.get(k, {}):
            keys.setdefault(k, {})[name] = list(cand.keys)

    def add(existing):
        if existing is None:
            raise FileNotFoundError(f"{path} is gone; the check runs are not kept")
        acc_now, meta_now = existing
        checks = check_runs.with_check(meta_now.get("forecaster_checks"), results, keys)
        return acc_now, dict(meta_now, forecaster_checks=checks)

    written = update_pact(path, add)
    line = (f"check run {check_runs.runs_of(written)} of {wanted_runs} (PSNR of the final latent against this "
            f"run's, dB): {results_text(results)}")
    left_out = sorted({name for k, name, _ in plans if name not in results.get(k, {})})
    if left_out:
        line += f"; left out, their cache would not fit the free GPU memory: {', '.join(map(choose.label, left_out))}"
    return line
