"""The three DPCache nodes (classic V1 node API): Calibrate, Schedule, Apply."""
from __future__ import annotations

import dataclasses
import logging
import os

import torch

from . import auto, memory, ui
from .apply_hook import ApplyHook
from .block_patches import check_unpatched, model_info
from .calibrate_hook import CHECK_RUNS, CalibrateHook
from .run_state import DEFAULT_SAMPLE_SIZE
from .sampling_hooks import install

try:
    from ..dpcache_core.windows import planning_view
except ImportError:  # pragma: no cover - CPU tests import the repo root as top level
    from dpcache_core.windows import planning_view

try:
    from .. import dpcache_core as core
except ImportError:  # pragma: no cover - CPU tests import the repo root as top level
    import dpcache_core as core

try:
    import folder_paths
except ImportError:  # no ComfyUI (CPU tests)
    folder_paths = None

log = logging.getLogger("dpcache")

CATEGORY = "sampling/dpcache"
FOLDER = "dpcache"
EXTENSIONS = {".safetensors"}
PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_DIR = os.path.join(PACK_DIR, "cost_matrices")
UNIFORM, MANUAL, AUTO = "(uniform)", "(manual)", "(auto)"
SPECTRUM = "(spectrum: no calibration)"  # the default: Spectrum's key steps (dpcache_core.replan.spectrum_plan)
PRIOR = "(prior: no calibration)"  # DP on the cost prior from the shipped PACTs (dpcache_core.prior)
NO_FILE = (SPECTRUM, PRIOR, UNIFORM, MANUAL)  # pact entries that are not files
FORECASTERS = ("auto", "spectral", "taylor")
DEFAULT_FORECASTER = "auto"
PRIOR_TAYLOR_ORDER = 1  # auto's Taylor order with (prior): order 1 beat order 2 there at K = 20 and 25 of 50
BUDGET_RULES = core.BUDGET_RULES
MODEL_TOOLTIP = ("A FLUX.1, FLUX.2, Chroma, HunyuanVideo (1.5), Qwen-Image, Z-Image, Lumina 2, Krea2, LTX-2, Kandinsky 5, Wan2.1 or Wan2.2 model "
                 "(for Wan2.2 A14B: each expert; README, Supported models). It is cloned; the input stays untouched.")
DEFAULT_ORDER = 2  # Taylor order of (uniform) / (manual) schedules: the better one for evenly spaced keys (BENCHMARKS.md)


def register_folder() -> None:
    """models/dpcache (plus the pack's cost_matrices) as ComfyUI model folder "dpcache".

    Entries from extra_model_paths.yaml stay where they are; models/dpcache is added after them.
    """
    if folder_paths is None:
        return
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([default, SHIPPED_DIR], set(EXTENSIONS))
        return
    paths, exts = folder_paths.folder_names_and_paths[FOLDER]
    for p in (default, SHIPPED_DIR):
        if p not in paths:
            paths.append(p)
    exts.update(EXTENSIONS)


def calibration_folder() -> str:
    """Where DPCache Calibrate writes: the first "dpcache" folder that is not the pack's own."""
    if folder_paths is None:
        return os.path.join(os.getcwd(), "models", FOLDER)
    for p in folder_paths.get_folder_paths(FOLDER):
        if os.path.abspath(p) != os.path.abspath(SHIPPED_DIR):
            return p
    return os.path.join(folder_paths.models_dir, FOLDER)


def pact_files() -> list[str]:
    if folder_paths is not None:
        return sorted(folder_paths.get_filename_list(FOLDER))
    if not os.path.isdir(SHIPPED_DIR):
        return []
    return sorted(f for f in os.listdir(SHIPPED_DIR) if os.path.splitext(f)[1] in EXTENSIONS)


def pact_path(name: str) -> str:
    """Full path of a PACT picked in the dropdown; only files inside the dpcache folders."""
    path = folder_paths.get_full_path(FOLDER, name) if folder_paths is not None else None
    if path is None and folder_paths is None and name in pact_files():
        path = os.path.join(SHIPPED_DIR, name)
    if path is None:
        raise core.PactFileError(f"PACT {name!r} not found in models/{FOLDER}/ or the pack's cost_matrices/; run DPCache Calibrate first or pick another")
    return path


def check_schedule(schedule):
    needed = ("key_steps", "num_evals", "model_family", "order", "scheme", "is_key")
    if not all(hasattr(schedule, a) for a in needed):
        raise ValueError("the schedule input must come from a DPCache Schedule node")
    return schedule


# --------------------------------------------------------------------------------------------
# Preview picture


def render_preview(schedule, cost=None, hop_costs=None) -> torch.Tensor:
    """IMAGE [1, H, W, 3] in 0..1: the PACT heatmap (as the plan read it) with the path, or a timeline without a PACT."""
    keys = list(schedule.key_steps)
    if cost is not None:
        arr = core.render_pact_path(cost, keys, title=schedule.planned_by, hop_costs=hop_costs)
    else:
        arr = core.render_timeline(schedule.num_evals, keys, title=schedule.planned_by)
    return core.to_comfy_image(arr)


def schedule_ui(schedule) -> dict:
    """The schedule as plain JSON for the frontend extension (ui key "dpcache_schedule")."""
    return {
        "key_steps": list(schedule.key_steps),
        "num_evals": schedule.num_evals,
        "ideal_speedup": round(schedule.ideal_speedup, 4),
        "source": schedule.source,
        "cost": schedule.cost,
    }


# --------------------------------------------------------------------------------------------
# Nodes


class DPCacheCalibrate:
    DESCRIPTION = (
        "Records a PACT (path-aware cost tensor) while sampling. Every evaluation is computed in full "
        "(no speed-up); when a sampling run finishes, one sample is added to models/dpcache/<pact_name>.safetensors. "
        "Queue several prompts (different seeds or prompts) to average more samples; an interrupted run adds nothing. "
        "Use the same sampler, scheduler and step count you will accelerate."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The same model, recording the cache point at every evaluation while it samples.",)
    FUNCTION = "calibrate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": MODEL_TOOLTIP}),
                "pact_name": ("STRING", {"default": "", "tooltip": "File name in models/dpcache/ (letters, digits, . _ -). Samples accumulate there across queued prompts. Empty: named after the model family, sampler, scheduler and step count when sampling starts (e.g. wan_uni_pc_simple_30). A run with other sigmas than the file's (scheduler, shift, denoise) is refused, not mixed in."}),
                "order": ("INT", {"default": 1, "min": 1, "max": 3, "tooltip": "Taylor order of the predictor the PACT is built for. 1 (default): planned on the exact cost of the skipped evaluations; the best or near-best schedule at most K in our benchmarks. 2 is the paper's choice: the file also stores the cost given the last three key steps the run really uses (history-exact), which DPCache Schedule then plans on. Must match the file's order. It does not limit the forecaster: the file keeps recorded trajectories on which DPCache Schedule's forecaster auto replays Taylor 1, Taylor 2 and spectral."}),
                "reset": ("BOOLEAN", {"default": False, "tooltip": "Start the file afresh on the next finished run (its old samples are dropped); later runs accumulate again."}),
            },
            "optional": {
                "sample_size": ("INT", {"default": DEFAULT_SAMPLE_SIZE, "min": 0, "max": 1 << 30, "step": 1024, "tooltip": "How many elements of the cache point (tokens x channels, a fixed seeded random pick per stream) estimate the PACT. Memory and time then stay about T x sample_size x 4 bytes per stream, whatever the resolution or frame count; 65536 picks the same schedules as all elements in our measurements. 0 = every element (exact, T x N x 4 bytes: gigabytes for FLUX at 1024x1024)."}),
                "check_runs": ("INT", {"default": CHECK_RUNS, "min": 0, "max": 16, "tooltip": "How many of the file's first recorded runs are followed by check runs: the same noise and prompt sampled again with the cache by Taylor 1, Taylor 2 and spectral at K = T/2, T/3, T/3.85, T/5 and T/5.5, each on the plan the replay finds best for it and Taylor 2 and spectral also on a history-exact plan (about 7 runs' time after each checked run), and the PSNR of each result against the recorded one kept in the file. DPCache Schedule's forecaster auto then takes the forecaster and way of planning these runs measured best. In our benchmarks (32 cases) that was within 0.5 dB of the best of them in all 32 with 8 check runs (a calibration of 8 or more runs), 29 with 4. 0 = none: faster calibration, and the forecaster is chosen by replaying the recorded runs alone."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def calibrate(self, model, pact_name, order, reset, sample_size=DEFAULT_SAMPLE_SIZE, check_runs=CHECK_RUNS,
                  unique_id=None):
        info = model_info(model)
        check_unpatched(model)
        hook = CalibrateHook(info.family, calibration_folder(), pact_name, order, reset, unique_id, sample_size, check_runs)
        m = model.clone()
        install(m, info, hook, "DPCache Calibrate")
        log.info("DPCache Calibrate: %s, recording into %s", info.detail, hook.describe_target())
        return (m,)


class DPCacheSchedule:
    DESCRIPTION = (
        "Chooses the key steps: the evaluations computed in full; the others are predicted. With a PACT, dynamic "
        "programming picks the K key steps of least predicted error; (uniform) spaces them evenly and (manual) "
        "takes the list you type, both without calibrating. Outputs the schedule and a picture of it."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("DPCACHE_SCHEDULE", "IMAGE")
    RETURN_NAMES = ("schedule", "preview")
    OUTPUT_TOOLTIPS = ("Key steps, T, model family and Taylor order, for Apply DPCache.", "The PACT heatmap with the chosen path (or a timeline of the key steps).")
    FUNCTION = "schedule"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pact": ([SPECTRUM, PRIOR, UNIFORM, MANUAL] + pact_files() + [AUTO], {"default": SPECTRUM, "tooltip": "(spectrum: no calibration), the default: Spectrum's key steps (a warm-up of T/10 or first_full_steps, windows that grow, the last 3) with the spectral forecaster, for any model and step count, no calibration needed; chosen by leave-one-model-out on four trained bench models, where no rule on the cost prior stayed at or above it at every K (BENCHMARKS.md). (prior: no calibration): dynamic programming on a cost prior averaged from the shipped FLUX and Wan PACTs. A calibrated PACT (models/dpcache/ and the pack's cost_matrices/) plans for your own model and sampler. (uniform) spaces the key steps evenly, (manual) takes your list. (auto): Apply DPCache's automatic mode (calibrates on the first run at a new setting, plans every later one; budget from key_steps of total_evaluations or target_speedup). The plan follows the file: PACTs from this version's DPCache Calibrate count only the evaluations that are skipped (history-exact at order 2 or more when the file holds that cost); older files and the paper authors' PACTs plan with the reference costs, as before. The text and picture say which."}),
                "key_steps": ("INT", {"default": 13, "min": 1, "max": 1000, "tooltip": "K: how many evaluations are computed in full, mandatory ones included. Ideal speed-up T/K. Ignored by (manual)."}),
                "first_full_steps": ("INT", {"default": 3, "min": 1, "max": 1000, "tooltip": "The first evaluations are always computed (the picture changes fastest there)."}),
                "last_full_steps": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip": "The last evaluations are always computed (fine detail). (spectrum: no calibration) keeps Spectrum's tail (the last 3, fewer at small key_steps, or this many if more); (prior: no calibration) keeps the last 3 as keys (or this many if more) where the run's key budget affords them under the hop cap, fewer where it cannot, at every run length."}),
                "total_evaluations": ("INT", {"default": 50, "min": 1, "max": 10000, "tooltip": "T for (uniform)/(manual): the model evaluations of your run (Euler: steps; Heun: about 2x steps). A PACT sets T itself."}),
                "manual_key_steps": ("STRING", {"default": "", "tooltip": "For (manual): key evaluations such as '0, 1, 2, 5, 9-11' (0-based; 0 is added)."}),
            },
            "optional": {  # optional so that API prompts written before they existed still validate
                "budget": (list(BUDGET_RULES), {"default": BUDGET_RULES[0], "tooltip": "How many key evaluations a run gets. A run whose evaluation count differs from T (other steps or sampler) is re-planned when sampling starts, from the PACT transferred to its count. same speed-up: key_steps at T, scaled to the run's count; target speed-up: count / target_speedup; fixed K: key_steps whatever the count. Not used by (manual)."}),
                "target_speedup": ("FLOAT", {"default": 3.85, "min": 1.0, "max": 100.0, "step": 0.05, "tooltip": "For budget = target speed-up: the ideal speed-up T/K to plan for."}),
                "taylor_order": ("INT", {"default": DEFAULT_ORDER, "min": 1, "max": 3, "tooltip": "Taylor order of the prediction for (prior), (uniform) and (manual) schedules with forecaster = taylor. 2 was the better order for evenly spaced key steps in our benchmark (BENCHMARKS.md). A PACT brings its own order (DPCache Calibrate's), so this is ignored with one."}),
                "forecaster": (list(FORECASTERS), {"default": DEFAULT_FORECASTER, "tooltip": "How skipped evaluations are predicted. auto (default): with a PACT whose DPCache Calibrate made check runs, the forecaster and plan they measured best at the nearest checked K (the faster within 0.5 dB); with one that keeps recorded trajectories but no check near K (the automatic mode, check_runs 0), Taylor 1, Taylor 2 and spectral are replayed on them, each on its DP plans, and the least replayed error wins (the text names the choice and the runner-up); without such data, spectral at every K with (spectrum: no calibration), and with the other entries spectral at ideal speed-ups T/K of 2.9x and more (K <= 17 of 50), taylor below (order 1 with (prior)). spectral: a Chebyshev fit by ridge regression over the key evaluations so far, blended with a linear extrapolation (Spectrum, CVPR 2026); holds on long hops; keeps up to 8 features per stream (FLUX 1024x1024 bf16: 8 x 25 MB). taylor: the Taylor expansion of the PACT's (or taylor_order's) order from the last order+1 key evaluations; order+1 features per stream. Both planned on the same costs (docs/forecasters.md)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, pact, **kwargs):
        if pact in NO_FILE or pact == AUTO:
            return ""
        try:  # re-run when calibration added samples to the file
            st = os.stat(pact_path(pact))
            return f"{st.st_mtime_ns}:{st.st_size}"
        except (ValueError, OSError):
            return ""

    def schedule(self, pact, key_steps, first_full_steps, last_full_steps, total_evaluations, manual_key_steps="",
                 budget=BUDGET_RULES[0], target_speedup=3.85, taylor_order=DEFAULT_ORDER, forecaster=DEFAULT_FORECASTER,
                 unique_id=None):
        if pact == AUTO:
            return auto_schedule(key_steps, first_full_steps, total_evaluations, budget, target_speedup, unique_id)
        notes: list[str] = []
        sched, cost, hop_costs = make_schedule(pact, key_steps, first_full_steps, last_full_steps, total_evaluations,
                                               manual_key_steps, budget, target_speedup, taylor_order, forecaster, notes)
        if sched.predictor == "spectral":
            how = f"spectral forecaster (keeps up to {core.spectral.DEFAULT_MAX_HISTORY} features per stream)"
        else:
            where = "chosen by replay" if "by replay" in " ".join(notes) else "from the PACT" if pact not in NO_FILE else "auto" if forecaster == "auto" and pact in (PRIOR, SPECTRUM) else "taylor_order"
            how = f"Taylor order {sched.order} ({where}; keeps {sched.order + 1} features per stream)"
        text = (
            f"key steps {list(sched.key_steps)}: {sched.num_keys} of {sched.num_evals} evaluations, "
            f"ideal speed-up {sched.ideal_speedup:.2f}x, {how}"
        )
        if notes:
            text += "; " + "; ".join(notes)
        if sched.convention:
            text += f"; planned with {core.schedule.PLANNING[sched.convention]}"
        if sched.planner is not None:
            text += (f". {sched.planner.label}; a run with another evaluation count is re-planned when sampling "
                     f"starts ({sched.planner.budget.describe(sched.num_evals)})")
        else:
            text += f". Manual keys: runs must make exactly {sched.num_evals} evaluations"
        if unique_id is not None:  # Apply DPCache reports the plan that ran back to this node
            object.__setattr__(sched, "ui_node", str(unique_id))
        log.info("DPCache Schedule (%s): %s", sched.source, text)
        ui.send_text(text, unique_id)
        return {"ui": {"text": [text], "dpcache_schedule": [schedule_ui(sched)]}, "result": (sched, render_preview(sched, cost, hop_costs))}


def auto_schedule(key_steps, first_full_steps, total_evaluations, budget, target_speedup, unique_id=None) -> dict:
    """DPCache Schedule's "(auto)": a marker for Apply DPCache's automatic mode; the plan is drawn after each run."""
    if budget == "target speed-up":
        rule = auto.auto_budget(target_speedup)
        own = auto.settings.DEFAULT_OWN_EVALS
    else:
        rule, own = core.Budget(budget, key_steps, target_speedup), int(total_evaluations)
    sched = auto.AutoSchedule(rule, own, int(first_full_steps), None if unique_id is None else str(unique_id))
    text = (f"(auto): the first run at a new setting calibrates (computes every evaluation), later runs are planned "
            f"from its PACT at {auto.describe_budget(rule, own)}. The plan that ran is shown here after each run")
    log.info("DPCache Schedule (auto): %s", text)
    ui.send_text(text, unique_id)
    preview = core.to_comfy_image(core.render_timeline(own, list(range(min(first_full_steps, own))),
                                                       title="(auto): planned when sampling starts"))
    return {"ui": {"text": [text]}, "result": (sched, preview)}


def make_schedule(pact, key_steps, first_full_steps=3, last_full_steps=0, total_evaluations=50, manual_key_steps="",
                  budget=BUDGET_RULES[0], target_speedup=3.85, taylor_order=DEFAULT_ORDER, forecaster=DEFAULT_FORECASTER,
                  notes=None):
    """(Schedule, cost tensor as the plan read it or None, history-exact hop costs or None) for the
    node's inputs; ValueError with what to change.

    The schedule is planned at its own T (the PACT's, or total_evaluations); its ``planner``
    re-plans runs of another evaluation count when sampling starts (``replan.plan_run``). With
    budget = target speed-up, a K the plan cannot meet is raised to the fewest that works, and a
    line saying so (the target, and the most that T allows) is appended to ``notes``."""
    notes = [] if notes is None else notes
    if forecaster not in FORECASTERS:
        raise ValueError(f"DPCache Schedule: unknown forecaster {forecaster!r}: use one of {', '.join(FORECASTERS)}")
    sched, cost, hop_costs = plan_entry(pact, key_steps, first_full_steps, last_full_steps, total_evaluations,
                                        manual_key_steps, budget, target_speedup, taylor_order, notes)
    if forecaster == "auto" and pact == SPECTRUM:  # spectral at every K: chosen by leave-one-model-out (BENCHMARKS.md)
        return dataclasses.replace(sched, predictor="spectral"), cost, hop_costs
    if forecaster == "auto" and pact not in NO_FILE:  # the file's replay trajectories choose, when it has them
        chosen, choice = core.choose.replayed_schedule(sched, *core.load_pact(pact_path(pact)))
        if choice is not None:
            notes.append(choice.describe())
            return chosen, cost, hop_costs if chosen.key_steps == sched.key_steps else None
    if forecaster == "auto":
        if core.spectral.auto_forecaster(sched.ideal_speedup) == "spectral":
            return dataclasses.replace(sched, predictor="spectral"), cost, hop_costs
        if pact == PRIOR:
            sched = dataclasses.replace(sched, order=PRIOR_TAYLOR_ORDER)
        forecaster = "taylor"
    return dataclasses.replace(sched, predictor=forecaster), cost, hop_costs


def plan_entry(pact, key_steps, first_full_steps=3, last_full_steps=0, total_evaluations=50, manual_key_steps="",
               budget=BUDGET_RULES[0], target_speedup=3.85, taylor_order=DEFAULT_ORDER, notes=None):
    """``make_schedule`` before the forecaster is chosen: the entry's Taylor schedule."""
    notes = [] if notes is None else notes
    try:
        if pact in NO_FILE and not 1 <= int(taylor_order) <= 3:
            raise ValueError(f"taylor_order must be 1, 2 or 3, got {taylor_order}")
        rule = core.Budget(budget, key_steps, target_speedup)
        by_speedup = budget == "target speed-up"  # else K as typed at the schedule's own T
        if by_speedup and pact == UNIFORM:
            asked = rule.keys_for(total_evaluations, total_evaluations)
            _, key_steps = core.replan.uniform_plan(total_evaluations, asked, first_full_steps, last_full_steps)
            notes += speedup_note(target_speedup, asked, key_steps, total_evaluations)
        if by_speedup and pact in (PRIOR, SPECTRUM):
            key_steps = rule.keys_for(total_evaluations, total_evaluations)
        if pact == SPECTRUM:
            keys = core.replan.spectrum_plan(total_evaluations, key_steps, first_full_steps, last_full_steps)
            planner = core.Planner(total_evaluations, rule, first_full_steps, last_full_steps, order=int(taylor_order),
                                   label=f"(spectrum) made for T={total_evaluations}", spectrum=True)
            return core.Schedule(tuple(keys), total_evaluations, order=int(taylor_order), source="spectrum",
                                 first_full_steps=first_full_steps, last_full_steps=last_full_steps, planner=planner), None, None
        if pact == MANUAL:
            keys = core.parse_key_steps(manual_key_steps, total_evaluations)
            return core.Schedule(tuple(keys), total_evaluations, order=int(taylor_order), source="manual",
                                 first_full_steps=first_full_steps, last_full_steps=last_full_steps), None, None
        if pact == PRIOR:
            cost = core.prior_cost(total_evaluations)
            typed_last = int(last_full_steps)

            def solve_prior(k):
                return core.prior.solve_prior(cost, k, first_full_steps, typed_last)

            keys, last_full_steps = (fewest_feasible(solve_prior, key_steps, total_evaluations, target_speedup)
                                     if by_speedup else solve_prior(key_steps))
            notes += speedup_note(target_speedup, key_steps, len(keys), total_evaluations) if by_speedup else []
            planner = core.Planner(total_evaluations, rule, first_full_steps, typed_last, cost=cost,
                                   order=core.prior.PRIOR_ORDER, label=f"(prior) made for T={total_evaluations}", prior=True)
            return core.Schedule(tuple(keys), total_evaluations, order=int(taylor_order), source="prior",
                                 cost=core.path_cost(cost, keys, "skip"), first_full_steps=first_full_steps,
                                 last_full_steps=last_full_steps, convention="skip", planner=planner), \
                core.cost_for(cost, "skip"), None
        if pact == UNIFORM:
            keys = core.uniform_key_steps(total_evaluations, key_steps, first_full_steps, last_full_steps)
            planner = core.Planner(total_evaluations, rule, first_full_steps, last_full_steps, order=int(taylor_order),
                                   label=f"(uniform) made for T={total_evaluations}")
            return core.Schedule(tuple(keys), total_evaluations, order=int(taylor_order), source="uniform",
                                 first_full_steps=first_full_steps, last_full_steps=last_full_steps, planner=planner), None, None
        acc, meta = core.load_pact(pact_path(pact))
        if acc.samples == 0 or not acc.counts.any():
            raise core.PactFileError(
                f"PACT {pact!r} holds no samples: queue at least one full sampling run through DPCache Calibrate "
                "with this pact_name, or pick another PACT"
            )
        # a PACT of partial runs (e.g. Wan2.2 A14B's two experts) covers windows of one trajectory
        cost, positions, starts = planning_view(acc.mean(), meta)
        num_evals = cost.shape[0]
        asked = key_steps = rule.keys_for(num_evals, num_evals) if by_speedup else key_steps
        required = [s + k for s in starts for k in range(max(first_full_steps, 1)) if s + k < num_evals]
        order, scheme = int(meta.get("order", 2)), meta.get("scheme", "reference")
        convention, hop_costs = planning_convention(meta, acc), None
        view = core.cost_for(cost, "reference" if convention == "reference" else "skip")
        history = acc.history_mean() if convention == "history" else None  # whole runs only: windowed PACTs have none

        def solve(k):
            if history is not None:
                return core.solve_schedule_history(history, k, first_full_steps, last_full_steps, scheme=scheme)
            return core.solve_schedule(cost, k, first_full_steps, last_full_steps, required=required, convention=convention)

        keys = fewest_feasible(solve, key_steps, num_evals, target_speedup) if by_speedup else solve(key_steps)
        notes += speedup_note(target_speedup, asked, len(keys), num_evals) if by_speedup else []
        if history is not None:
            hop_costs = core.hop_costs_history(history, keys, first_full_steps, scheme)
            total = sum(hop_costs)
        else:
            total = core.path_cost(cost, keys, convention)
        label = f"PACT calibrated at T={num_evals}" + (f" (windows starting at {[0] + starts})" if starts else "")
        planner = core.Planner(num_evals, rule, first_full_steps, last_full_steps, cost=cost, positions=positions,
                               order=order, label=label)
        sched = core.Schedule(
            tuple(keys), num_evals, model_family=meta.get("model_family"), order=order, scheme=scheme,
            source=f"pact:{pact}", cost=total, first_full_steps=first_full_steps, last_full_steps=last_full_steps,
            convention=convention, planner=planner,
        )
        return sched, view, hop_costs
    except ValueError as exc:  # the same error type (dpcache.PactFileError, ...), the node named
        raise same_error(exc, f"DPCache Schedule: {exc}") from None


def same_error(exc: ValueError, message: str) -> ValueError:
    """``exc``'s own type (PactFileError, ScheduleMismatchError, ...) with ``message``; ValueError when
    that type cannot be built from a message alone."""
    try:
        return type(exc)(message)
    except Exception:  # noqa: BLE001 - e.g. UnicodeDecodeError needs five arguments
        return ValueError(message)


def fewest_feasible(solve, asked: int, num_evals: int, target: float):
    """``solve(k)`` at the first k from ``asked`` up to T that has a schedule; the error names the target."""
    for k in range(max(asked, 1), num_evals + 1):
        try:
            return solve(k)
        except ValueError as exc:
            error = exc
    raise ValueError(f"target speed-up {target:g}x: no K from {asked} to T={num_evals} has a schedule on this PACT "
                     f"({error})")


def speedup_note(target: float, asked: int, used: int, num_evals: int) -> list[str]:
    """The note when a target speed-up needed more key steps than T / target."""
    if used == asked:
        return []
    return [f"target speed-up {target:g}x needs K={asked}, raised to K={used} (the fewest the mandatory steps and "
            f"the hop cap allow): the most T={num_evals} allows is {num_evals / used:.3g}x"]


def planning_convention(meta: dict, acc) -> str:
    """How a PACT file is planned: its recorded "convention" ("reference" when absent: files written
    before issue 11 and the authors' PACTs plan as before); "skip" with a history cost tensor at
    order >= 2 means the history-exact DP."""
    convention = meta.get("convention", "reference")
    if convention not in core.schedule.CONVENTIONS:
        raise core.PactFileError(f"the PACT records an unknown cost convention {convention!r}; calibrate it again")
    if convention == "skip" and int(meta.get("order", 2)) >= 2 and acc.history_sums is not None:
        return "history"
    return convention


class DPCacheApply:
    DESCRIPTION = (
        "Accelerates sampling with a DPCache schedule: at key evaluations every transformer block runs; at the "
        "others no block runs and the last block's output is predicted from the key ones by the schedule's forecaster (Taylor or spectral). "
        "Returns a patched clone; the input MODEL stays untouched. Reports computed/skipped evaluations and wall "
        "time after each run."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A clone of the model that skips the non-key evaluations.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": MODEL_TOOLTIP}),
            },
            "optional": {
                "schedule": ("DPCACHE_SCHEDULE", {"tooltip": "From DPCache Schedule. Not connected (or Schedule's (auto)): automatic mode, the first run at a new setting calibrates and later runs are planned (docs/auto.md). A run with another number of model evaluations (steps, sampler, a KSamplerAdvanced slice) is re-planned from it when sampling starts; a (manual) schedule needs exactly its T."}),
                "target_speedup": ("FLOAT", {"default": auto.settings.DEFAULT_TARGET_SPEEDUP, "min": 1.0, "max": 50.0, "step": 0.05, "tooltip": "Automatic mode only: the ideal speed-up T/K to plan for (3.85 = K 13 of 50, DPCache Schedule's default), scaled to the run's evaluation count."}),
                "refine_every": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip": "Automatic mode only: every N-th run at a setting is a calibration run that adds a sample to its PACT (computes every evaluation). 0 = off: calibrate once."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def apply(self, model, schedule=None, target_speedup=auto.settings.DEFAULT_TARGET_SPEEDUP, refine_every=0, unique_id=None):
        if schedule is None or getattr(schedule, "auto", False):
            return self.apply_auto(model, schedule, target_speedup, refine_every, unique_id)
        schedule = check_schedule(schedule)
        info = model_info(model)
        check_unpatched(model)
        if schedule.model_family not in (None, info.family):
            raise core.ScheduleMismatchError(
                f"the schedule was planned on a {schedule.model_family} PACT ({schedule.source}) but this MODEL is "
                f"{info.detail}; calibrate a PACT for this model, or use a (uniform) or (manual) schedule"
            )
        m = model.clone()
        install(m, info, ApplyHook(schedule, info.family, unique_id), "Apply DPCache")
        memory.reserve(m, memory.cache_bytes(m, schedule.order, schedule.predictor))  # ComfyUI's model loading keeps room for the cache
        log.info("Apply DPCache: %s; %s", info.detail, schedule.describe())
        return {"ui": {"dpcache_schedule": [schedule_ui(schedule)]}, "result": (m,)}

    def apply_auto(self, model, marker, target_speedup, refine_every, unique_id):
        info = model_info(model)
        check_unpatched(model)
        if marker is None:
            budget, own, first, schedule_node = auto.auto_budget(target_speedup), auto.settings.DEFAULT_OWN_EVALS, auto.FIRST_FULL_STEPS, None
        else:
            budget, own, first, schedule_node = marker.budget, marker.own_num_evals, marker.first_full_steps, marker.node_id
        hook = auto.AutoHook(info.family, calibration_folder(), budget, own, refine_every, unique_id, schedule_node, first)
        m = model.clone()
        install(m, info, hook, "Apply DPCache")
        # the forecaster is chosen when a run starts (by replay on the file's data): room for the largest, the spectral ring
        memory.reserve(m, memory.cache_bytes(m, auto.AUTO_ORDER, "spectral"))
        log.info("Apply DPCache: %s; automatic mode (%s), PACTs in %s", info.detail, auto.describe_budget(budget, own), hook.folder)
        return (m,)


register_folder()

NODE_CLASS_MAPPINGS = {
    "DPCacheCalibrate": DPCacheCalibrate,
    "DPCacheSchedule": DPCacheSchedule,
    "DPCacheApply": DPCacheApply,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DPCacheCalibrate": "DPCache Calibrate",
    "DPCacheSchedule": "DPCache Schedule",
    "DPCacheApply": "Apply DPCache",
}
