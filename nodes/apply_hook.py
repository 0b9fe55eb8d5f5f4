"""Apply DPCache with a schedule: plan each sampling run from it, and report the plan that ran."""
from __future__ import annotations

import logging
import time

try:  # inside ComfyUI the pack is a package; in the CPU tests the repo root is on sys.path
    from ..dpcache_core import ScheduleMismatchError
    from ..dpcache_core.replan import plan_run
    from ..dpcache_core.runtime import mismatch_message
except ImportError:  # pragma: no cover - depends on how the pack is imported
    from dpcache_core import ScheduleMismatchError
    from dpcache_core.replan import plan_run
    from dpcache_core.runtime import mismatch_message

from . import memory, run_state, ui
from .sampler_counts import sampler_name
from .sampling_hooks import failure_text, refuse_context_windows, run_shape, sample_with_run, uses_controlnet

log = logging.getLogger("dpcache")


def plan_line(keys, n: int) -> str:
    """One line on what a run's plan leaves to skip: its ideal speed-up, or that T leaves nothing to skip
    (few steps: the first evaluations always computed, or a budget of K >= T) and the run is the plain run."""
    k = len(keys)
    if k >= n:
        return (f"T={n} leaves nothing to skip ({k} key evaluations of {n}): this run is the plain run, every "
                "evaluation computed; use more steps for a speed-up")
    return f"{k} of {n} evaluations computed, {n - k} skipped: ideal speed-up {n / k:.2f}x"


def report_plan_run(run: run_state.ApplyRun, node_ids, source: str, label: str | None = None,
                    asked: int | None = None, first_full: int | None = None) -> None:
    """The end-of-run report of a planned run (Apply DPCache with a schedule or in the automatic mode):
    keys, evaluations computed, T, ideal and measured speed-up, forecaster, and what the calls did
    besides the plan; on each node that fed the run, as the frontend's event, and in the log after
    ``label`` (None: not logged, the caller logs the run's summary). ``asked``: the K the automatic
    mode's budget asked for (said when the run needed more)."""
    sched = run.cache.schedule
    keys, n = list(sched.key_steps), sched.num_evals
    measured = run.measured_speedup()
    m = f", measured {measured:.2f}x" if measured else ""
    head = f"{run.plan_text}: " if run.plan_text else ""
    line = (f"{head}keys {keys}: {run.cache.computed} of {run.evaluations} evaluations computed, "
            f"T={n}, ideal {n / len(keys):.2f}x{m}, {sched.predictor} forecaster"
            + (f" of order {sched.order}" if sched.predictor == "taylor" else ""))
    if len(keys) >= n:
        why = "" if asked is None else (f" (K={asked} asked, at least {min(first_full, n)} first evaluations are "
                                        "always computed)")
        line += f"; nothing skipped: the plain run{why}"  # its start said that T leaves nothing to skip
    elif asked is not None and len(keys) > asked:
        line += f" (K raised from {asked}: the fewest this run allows)"
    extra = run.report()  # calls computed in full, extra calls of other nodes (e.g. Skip Layer Guidance)
    if extra:
        line += f"; {extra}"
    line += f"; wall {time.perf_counter() - run.cache.started:.2f} s"
    if label is not None:
        log.info("%s: %s", label, line)
    ui.report_event(node_ids, keys, n, run.cache.computed, run.cache.skipped, line, source, measured)


class ApplyHook:
    """Immutable per-node config of Apply DPCache; builds a fresh ApplyRun for every sampling run."""

    def __init__(self, schedule, family: str, node_id=None):
        self.schedule = schedule
        self.family = family
        self.node_id = node_id

    def start(self, guider, args) -> run_state.ApplyRun:
        sampler, sigmas = args[2], args[3]
        refuse_context_windows(guider, "Apply DPCache")
        shape = run_shape(guider, sampler, sigmas)
        schedule, plan_text = self.schedule, ""
        if shape is not None:  # count known up front: plan for it (a manual schedule of another T is refused)
            try:
                plan = plan_run(self.schedule, shape)
            except ScheduleMismatchError:  # before the first evaluation, with both numbers and the sampler
                raise ScheduleMismatchError(
                    mismatch_message(shape.num_evals, self.schedule.num_evals, sampler_name(sampler))) from None
            schedule, plan_text = plan.schedule, plan.text
            if plan_text:
                log.info("DPCache: %s", plan_text)
        schedule, fit = memory.fit_run(schedule, guider, args[0].shape)  # the forecaster whose cache fits
        if fit is not None and fit.note:
            plan_text = f"{plan_text}; {fit.note}" if plan_text else fit.note
        line = plan_line(schedule.key_steps, schedule.num_evals)
        log.info("DPCache: %s", line)
        ui.send_text(line, self.node_id)
        force_all = uses_controlnet(guider)
        if force_all:
            msg = "DPCache: ControlNet detected; it adds residuals between blocks, so every evaluation is computed in full"
            log.warning(msg)
            ui.send_text(msg, self.node_id)
        return run_state.ApplyRun(self.family, schedule, force_all, sampler_name(sampler), plan_text, fit)

    def finish(self, run: run_state.ApplyRun, ok: bool) -> None:
        if not ok:
            log.info("DPCache: run stopped after %d evaluations; its cache is freed", run.evaluations)
            return
        log.info(run.summary())
        schedule_node = getattr(self.schedule, "ui_node", None)  # the DPCache Schedule that fed it: shows the plan that ran
        report_plan_run(run, (self.node_id, schedule_node), run.cache.schedule.source)
        if run.evaluations != run.cache.schedule.num_evals:  # a sampler whose count is only known while it samples
            self.warn(f"{mismatch_message(run.evaluations, run.cache.schedule.num_evals, run.sampler)}. This run's "
                      "output is returned (its last planned key evaluations did not come)")

    def warn(self, text: str) -> None:
        """One log line, and the text on this node and on the DPCache Schedule that fed it."""
        log.warning("Apply DPCache: %s", text)
        for node in (self.node_id, getattr(self.schedule, "ui_node", None)):
            ui.send_text(f"Apply DPCache: {text}", node)

    def failed(self, run: run_state.ApplyRun, exc: Exception) -> None:
        """The end-of-run work failed after the sampler returned (``sample_with_run``): say so."""
        self.warn(f"after the sampling run: {failure_text(exc)}; the sampler's output is returned")

    def outer_sample(self, executor, *args, **kwargs):
        return sample_with_run(executor, args, kwargs, self.start, self.finish, self.failed)

    def __deepcopy__(self, memo):  # ComfyUI deep-copies model_options on clone: share, it is immutable
        return self
