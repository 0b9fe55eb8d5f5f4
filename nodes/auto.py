"""Apply DPCache's automatic mode (no schedule connected, or DPCache Schedule's "(auto)").

At the start of every sampling run the run's setting is worked out (``dpcache_core.settings``):

- a PACT file of that setting exists in models/dpcache/: the run is planned by the DP from it at the
  budget (the target speed-up, K = 13 of 50 by default, scaled to the run's evaluation count);
- none, but one of the same model (another sampler, scheduler or step count): the run is planned
  from the nearest such file by the transfer (``dpcache_core.transfer``), and the report says so;
- none at all: the run computes every evaluation (its output is the plain run's, bit for bit),
  records a sampled PACT sample and, when it finishes, saves it atomically under a lock file; an
  interrupted run writes nothing;
- a damaged file of that setting: refused with the file named; the run computes in full;
- a setting whose sample could not be saved earlier in this process (an unwritable models/dpcache):
  planned on the calibration-free cost prior (``dpcache_core.prior``), with a note, instead of being
  computed in full again. The run that failed to save returned its output and said why (``failed``).

``refine_every`` = N > 0 makes every N-th run of a setting (counted per node) a calibration run that
adds a sample to the file. After every run the node (and the DPCache Schedule that fed it) shows the
plan that ran: keys, count, T, ideal and measured speed-up, and the frontend redraws its timeline.
"""
from __future__ import annotations

import logging
import os
import time
import weakref
from dataclasses import dataclass

import numpy as np

try:  # inside ComfyUI the pack is a package; in the CPU tests the repo root is on sys.path
    from .. import dpcache_core as core
    from ..dpcache_core import settings
    from ..dpcache_core.pact import default_max_gap
    from ..dpcache_core.transfer import index_positions
except ImportError:  # pragma: no cover - depends on how the pack is imported
    import dpcache_core as core
    from dpcache_core import settings
    from dpcache_core.pact import default_max_gap
    from dpcache_core.transfer import index_positions

from . import calibrate_hook, memory, run_state, ui
from .apply_hook import plan_line, report_plan_run
from .sampling_hooks import failure_text, guess_scheduler, refuse_context_windows, run_shape, sample_with_run, uses_controlnet
from .sampler_counts import sampler_name

log = logging.getLogger("dpcache")

#: PACT paths whose calibration sample could not be saved in this process -> why (``AutoHook.failed``)
UNSAVED: dict[str, str] = {}

AUTO_ORDER = 1  # calibrated at order 1: the sampled sample costs ~6 % of a run (BENCHMARKS.md §9)
FIRST_FULL_STEPS = 3  # DPCache Schedule's default


# --------------------------------------------------------------------------------------------
# The budget


def describe_budget(budget: core.Budget, own_num_evals: int) -> str:
    """"target 3.85x (K=13 of 50, scaled to the run's count)" for the automatic mode's budget."""
    if budget.rule == "same speed-up":
        return f"target {own_num_evals / budget.keys:.2f}x (K={budget.keys} of {own_num_evals}, scaled to the run's count)"
    return budget.describe(own_num_evals)


def auto_budget(target_speedup: float = settings.DEFAULT_TARGET_SPEEDUP) -> core.Budget:
    """K = round(50 / target) of 50, scaled to the run's count by the "same speed-up" rule: the
    default 3.85x is DPCache Schedule's default, K = 13 of 50."""
    if not target_speedup >= 1.0:
        raise ValueError(f"target_speedup must be at least 1.0, got {target_speedup}")
    keys = max(1, int(round(settings.DEFAULT_OWN_EVALS / float(target_speedup))))
    return core.Budget("same speed-up", keys)


@dataclass(frozen=True)
class AutoSchedule:
    """DPCache Schedule's "(auto)" output: a marker Apply DPCache honours with the automatic mode."""

    budget: core.Budget
    own_num_evals: int = settings.DEFAULT_OWN_EVALS
    first_full_steps: int = FIRST_FULL_STEPS
    node_id: str | None = None
    auto: bool = True

    def describe(self) -> str:
        return f"automatic ({describe_budget(self.budget, self.own_num_evals)})"


# --------------------------------------------------------------------------------------------
# What the run is


#: The digest of each loaded diffusion model's weights as loaded (computed once per model, not per run)
BASE_WEIGHTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def base_weights(model_patcher) -> str:
    """``settings.tensors_digest`` of the diffusion model's parameters as loaded: a weight a patch
    changed in place is read from the patcher's backup. Cached per model object: read once."""
    dm = model_patcher.get_model_object("diffusion_model")
    try:
        return BASE_WEIGHTS[dm]
    except (KeyError, TypeError):
        pass
    backup = getattr(model_patcher, "backup", None) or {}
    named = []
    for name, p in dm.named_parameters():
        saved = backup.get("diffusion_model." + name)
        named.append((name, getattr(saved, "weight", saved) if saved is not None else p))
    digest = settings.tensors_digest(named)
    try:
        BASE_WEIGHTS[dm] = digest
    except TypeError:  # not weakly referable: computed per run
        pass
    return digest


def weights_key(model_patcher) -> str:
    """The setting's weights: as loaded, with the weight patches (LoRAs) and weight hooks (Create Hook LoRA)."""
    return settings.weights_fingerprint(base_weights(model_patcher), getattr(model_patcher, "patches", None),
                                        getattr(model_patcher, "hook_patches", None))


def conditionings_per_evaluation(guider) -> int:
    """2 when the sampler evaluates cond and uncond (cfg != 1), else 1 (ComfyUI skips uncond at cfg 1)."""
    conds = getattr(guider, "conds", None) or {}
    if not conds.get("negative"):
        return 1
    cfg = getattr(guider, "cfg", None)
    disabled = guider.model_options.get("disable_cfg1_optimization", False)
    return 1 if cfg is not None and float(cfg) == 1.0 and not disabled else 2


def run_setting(guider, family: str, sampler, sigmas, latent, shape) -> settings.Setting:
    window = f"{shape.start:.2f}-{shape.end:.2f}" if shape.partial else ""
    bucket = settings.resolution_bucket(int(np.prod(latent.shape[2:]))) if settings.RESOLUTION_KEYED else ""
    return settings.Setting(
        family=family,
        weights=weights_key(guider.model_patcher),
        sampler=sampler_name(sampler) or "sampler",
        scheduler=guess_scheduler(guider, sigmas) or "custom",
        sigmas=settings.sigmas_hash(sigmas.detach().float().cpu().reshape(-1).tolist()),
        num_evals=shape.num_evals,
        conds=conditionings_per_evaluation(guider),
        window=window,
        bucket=bucket,
    )


# --------------------------------------------------------------------------------------------
# Planning from a file


def plan_keys(acc, meta: dict, shape, budget: core.Budget, own_num_evals: int, first_full_steps: int):
    """(keys, K asked for, replay choice or None) for a run of ``shape`` from a PACT (its own T, or
    transferred). With replay trajectories in the file (``dpcache_core.choose``), a run at the file's
    own positions takes the chosen keys; another count takes the forecaster chosen at the file's T."""
    n = shape.num_evals
    cost = acc.mean()
    file_positions = meta.get("positions")
    run_positions = (list(shape.positions) + [shape.end]) if shape.positions else None
    if file_positions is None or run_positions is None:
        file_positions, run_positions = None, index_positions(n)
    planner = core.Planner(cost.shape[0], budget, first_full_steps, 0, cost=cost, positions=file_positions,
                           order=int(meta.get("order", AUTO_ORDER)))
    k = budget.keys_for(n, own_num_evals)
    choice = None
    if not shape.partial:
        try:
            choice = core.choose.replay_choice(acc, meta, budget.keys_for(planner.num_evals, own_num_evals),
                                               first_full_steps, 0)
        except ValueError:  # no finite plan at this K on the file's T: plan as without trajectories
            choice = None
    if choice is not None and planner.same_positions(run_positions, by_sigma=shape.positions is not None):
        return list(choice.best.keys), k, choice
    convention = meta.get("convention", "reference")
    keys, _, _ = planner.solve(run_positions, k, (), "skip" if convention == "skip" else "reference")
    return keys, k, choice


# --------------------------------------------------------------------------------------------
# Runs


class FullRun(run_state.RunState):
    """Every evaluation computed, nothing recorded (a damaged file, or a run the mode cannot plan)."""

    def __init__(self, family: str):
        super().__init__(family)
        self.evaluations = 0

    def start_evaluation(self, sigma=None) -> None:
        self.evaluations += 1
        self.new_evaluation()

    def decide(self, call, block_patches, control) -> None:
        """Every block computes; nothing is cached or recorded."""

    def close(self) -> None:
        pass


class AutoHook:
    """Per-node config of the automatic mode; decides at every sampling start (see the module docstring)."""

    def __init__(self, family: str, folder: str, budget: core.Budget | None = None,
                 own_num_evals: int = settings.DEFAULT_OWN_EVALS, refine_every: int = 0, node_id=None,
                 schedule_node=None, first_full_steps: int = FIRST_FULL_STEPS,
                 sample_size: int = run_state.DEFAULT_SAMPLE_SIZE):
        if refine_every < 0:
            raise ValueError(f"refine_every must be 0 (off) or a positive number of runs, got {refine_every}")
        self.family = family
        self.folder = folder
        self.budget = budget or auto_budget()
        self.own_num_evals = int(own_num_evals)
        self.refine_every = int(refine_every)
        self.node_id = node_id
        self.schedule_node = schedule_node
        self.first_full_steps = int(first_full_steps)
        self.sample_size = int(sample_size)
        self.runs: dict[str, int] = {}  # runs per setting key, for refine_every (shared by every run of this node output)
        self.plans: dict = {}  # the last plan made (``plan``)

    def __deepcopy__(self, memo):
        return self

    def say(self, text: str) -> None:
        log.info("DPCache (auto): %s", text)
        for n in (self.node_id, self.schedule_node):
            ui.send_text(text, n)

    # ---- start

    def start(self, guider, args):
        sampler, sigmas, latent = args[2], args[3], args[1]
        refuse_context_windows(guider, "Apply DPCache")
        shape = run_shape(guider, sampler, sigmas)
        if shape is None:
            self.say(f"the evaluation count of sampler {sampler_name(sampler)} is only known while it samples: the "
                     "automatic mode cannot key or plan this run, so every evaluation is computed. Use a sampler "
                     "whose count follows from its steps, or DPCache Calibrate + DPCache Schedule")
            return self.full_run("unknown count")
        setting = run_setting(guider, self.family, sampler, sigmas, latent, shape)
        count = self.runs[setting.key] = self.runs.get(setting.key, 0) + 1
        path = os.path.join(self.folder, setting.file_name())
        found = None
        if os.path.exists(path):
            try:
                acc, meta = core.load_pact(path)
                found = settings.Found(path, meta, True)
            except core.PactFileError as exc:
                self.say(f"{exc}. This run computes every evaluation and records nothing; delete or move {path} "
                         "to calibrate this setting again")
                return self.full_run("damaged file")
        else:
            found = settings.nearest(self.folder, setting)
            if found is not None:
                try:
                    acc, meta = core.load_pact(found.path)
                except core.PactFileError:
                    found = None
        refine = found is not None and found.exact and self.refine_every and count % self.refine_every == 0
        unsaved = UNSAVED.get(path)
        if unsaved is not None and found is None:  # its sample could not be saved: not recomputed in full forever
            return self.prior_run(guider, sampler, args[0].shape, setting, shape, path, unsaved)
        if (found is None or refine) and unsaved is None:
            return self.calibration_run(guider, args, setting, path, shape, count, refine)
        return self.planned_run(guider, sampler, args[0].shape, setting, shape, found, acc)

    def full_run(self, why: str):
        run = FullRun(self.family)
        run.auto = ("full", why)
        return run

    def calibration_run(self, guider, args, setting, path, shape, count, refine):
        run = calibrate_hook.calibration_run(self.family, guider, args, self.sample_size, shape.num_evals)
        run.auto = ("calibrate", setting, path, count, refine, time.perf_counter())
        why = f"refining this setting (run {count}, every {self.refine_every})" if refine else f"calibrating this setting (run {count})"
        self.say(f"{why}: every evaluation is computed (the plain run's output) and a PACT sample is recorded into "
                 f"{os.path.basename(path)}; setting {setting.describe()}")
        return run

    def planned_run(self, guider, sampler, noise_shape, setting, shape, found, acc):
        n = shape.num_evals
        try:
            keys, asked, choice = self.plan(found, acc, shape)
        except ValueError as exc:
            self.say(f"{found.name} cannot plan this run ({exc}); every evaluation is computed")
            return self.full_run("no plan")
        T = found.meta.get("num_evals")
        how = (f"planned from {found.name} ({found.meta.get('samples', '?')} sample(s), calibrated at this setting)"
               if found.exact else f"transferred from {found.name} (T={T}, {found.meta.get('sampler')}/"
               f"{(found.meta.get('setting') or {}).get('scheduler')}) to T={n}")
        if choice is not None:  # the forecaster the file's replay trajectories chose
            predictor, order = choice.best.predictor, choice.best.order
            how += f"; {choice.describe()}"
        else:  # as DPCache Schedule's "auto" without data
            predictor, order = None, int(found.meta.get("order", AUTO_ORDER))
        return self.keyed_run(guider, sampler, noise_shape, setting, keys, n, how, found.name, asked, order,
                              found.meta.get("scheme", "reference"),
                              "skip" if found.meta.get("convention") == "skip" else "reference", predictor)

    def prior_run(self, guider, sampler, noise_shape, setting, shape, path, why: str):
        """A run planned on the calibration-free cost prior, for a setting whose sample could not be saved."""
        n = shape.num_evals
        asked = self.budget.keys_for(n, self.own_num_evals)
        try:
            positions = (list(shape.positions) + [shape.end]) if shape.positions else None
            cost = core.prior_cost(n, positions)
            keys = None
            for k in range(asked, n + 1):  # raised to the fewest keys the first steps and the hop cap allow
                try:
                    keys, _ = core.prior.solve_prior(cost, k, self.first_full_steps)
                    break
                except ValueError:
                    if k == n:
                        raise
        except ValueError as exc:
            self.say(f"{os.path.basename(path)} could not be saved earlier ({why}) and the cost prior cannot plan this "
                     f"run ({exc}); every evaluation is computed")
            return self.full_run("no plan")
        how = (f"planned on the cost prior (no calibration): {os.path.basename(path)} could not be saved earlier in "
               f"this session ({why})")
        return self.keyed_run(guider, sampler, noise_shape, setting, keys, n, how, "prior", asked, AUTO_ORDER, "reference", "skip")

    def keyed_run(self, guider, sampler, noise_shape, setting, keys, n, how, name, asked, order, scheme, convention,
                  predictor=None):
        """The ApplyRun of ``keys`` (``predictor`` None: as DPCache Schedule's "auto" without data), with the
        forecaster whose cache fits the free GPU memory (``memory.fit_run``)."""
        schedule = core.Schedule(tuple(keys), n, model_family=self.family, order=order, scheme=scheme,
                                 source=f"auto:{name}", first_full_steps=self.first_full_steps, convention=convention,
                                 predictor=predictor or core.spectral.auto_forecaster(n / len(keys)))
        schedule, fit = memory.fit_run(schedule, guider, noise_shape)  # the forecaster whose cache fits
        if fit is not None and fit.note:
            how = f"{how}; {fit.note}"
        force_all = uses_controlnet(guider)
        run = run_state.ApplyRun(self.family, schedule, force_all, sampler_name(sampler), how, fit)
        run.auto = ("plan", setting, name, asked)
        self.say(f"{how}: keys {list(keys)}; {plan_line(keys, n)}")
        return run

    def plan(self, found, acc, shape):
        """``plan_keys`` for this run, remembered per file version, run shape and budget (the replay
        takes a second or two; every later run at the setting reuses it)."""
        try:
            stat = os.stat(found.path)
            version = (found.path, stat.st_mtime_ns, stat.st_size)
        except OSError:
            version = (found.path, None, None)
        key = (version, shape, self.budget, self.own_num_evals, self.first_full_steps)
        if key not in self.plans:
            self.plans.clear()  # one entry per node: the last setting planned
            self.plans[key] = plan_keys(acc, found.meta, shape, self.budget, self.own_num_evals, self.first_full_steps)
        return self.plans[key]

    # ---- finish

    def finish(self, run, ok: bool) -> None:
        kind = run.auto[0]
        if not ok:
            what = "nothing written" if kind == "calibrate" else "its cache is freed"
            self.say(f"run stopped after {run.evaluations} evaluations; {what}")
            return
        if kind == "full":
            n = run.evaluations
            ui.report_event((self.node_id, self.schedule_node), range(n), n, n, 0,
                            f"{n} of {n} evaluations computed ({run.auto[1]})", "auto")
        elif kind == "calibrate":
            self.finish_calibration(run)
        else:
            self.finish_planned(run)

    def finish_calibration(self, run) -> None:
        _, setting, path, count, refine, t0 = run.auto
        n = run.evaluations
        if n != setting.num_evals or n < AUTO_ORDER + 1:
            self.say(f"this run made {n} evaluations, not the {setting.num_evals} expected; nothing written")
            return
        sample = run.recorder.build_sample(AUTO_ORDER, "reference", max_anchor_gap=default_max_gap(n))
        size = run.recorder.sample_description()
        meta = {"model_family": self.family, "order": AUTO_ORDER, "scheme": "reference", "convention": "skip",
                "sampler": setting.sampler, "scheduler": setting.scheduler, "steps": n, "sample_size": size,
                "sample_seed": None if size == "all" else run.recorder.seed, "automatic": True}
        meta.update(calibrate_hook.trajectory_metadata(run))
        record = settings.sample_record(run.resolution, run.seed, setting.sampler, setting.scheduler)
        written = settings.add_sample(path, setting, sample, meta, record,  # an error: ``failed``
                                      trajectories=core.replay.replay_sample(run.recorder))
        UNSAVED.pop(path, None)
        wall = time.perf_counter() - t0
        line = (f"calibrated this setting (run {count}): {n} of {n} evaluations computed (the plain run), "
                f"{os.path.basename(path)} now holds {written['samples']} sample(s); the next run at this setting "
                f"is planned ({describe_budget(self.budget, self.own_num_evals)}). wall {wall:.2f} s")
        log.info("DPCache (auto): %s", line)
        ui.report_event((self.node_id, self.schedule_node), range(n), n, n, 0, line, f"auto:{os.path.basename(path)}")

    def finish_planned(self, run) -> None:
        _, setting, name, asked = run.auto
        report_plan_run(run, (self.node_id, self.schedule_node), f"auto:{name}", "DPCache (auto)", asked,
                        self.first_full_steps)

    def failed(self, run, exc: Exception) -> None:
        """The end-of-run work failed after the sampler returned (``sample_with_run``): the output is
        returned; a calibration whose sample was not saved is remembered, so later runs at that setting
        (in this process) are planned on the cost prior instead of computed in full again."""
        if run.auto[0] != "calibrate":
            self.say(f"after the sampling run: {failure_text(exc)}; the sampler's output is returned")
            return
        path = run.auto[2]
        UNSAVED[path] = failure_text(exc)
        fix = f" Make {os.path.dirname(path)} a writable folder to calibrate" if isinstance(exc, OSError) else ""
        self.say(f"the PACT sample of this setting was not saved to {path}: {failure_text(exc)}. This run's output "
                 "(the plain run's) is returned; later runs at this setting are planned on the cost prior (no "
                 f"calibration) until ComfyUI restarts.{fix}")

    def outer_sample(self, executor, *args, **kwargs):
        return sample_with_run(executor, args, kwargs, self.start, self.finish, self.failed)
