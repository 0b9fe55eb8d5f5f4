"""DPCache core: the Path-Aware Cost Tensor, the exact DP schedule and the Taylor predictor.

Plain torch + numpy; no ComfyUI import, so it runs and is tested anywhere.
"""
from . import check_runs, choose, replay
from .history import build_history, history_fits
from .pact import PactAccumulator, build_pact, default_max_gap
from .picture import render_image_rows, render_pact_path, render_timeline, to_comfy_image, write_png
from .prior import prior_cost
from .replan import BUDGET_RULES, Budget, Planner, RunPlan, RunShape, joint_trajectory, plan_run
from .runtime import CacheRun, ScheduleMismatchError, TrajectoryRecorder
from .schedule import (
    Schedule,
    cost_for,
    hop_costs_history,
    mandatory_steps,
    parse_key_steps,
    path_cost,
    path_cost_history,
    solve_schedule,
    solve_schedule_history,
    uniform_key_steps,
)
from .spectral import SpectralPredictor
from .spectrum_keys import spectrum_key_steps
from .store import PACK_VERSION, PactFileError, import_reference, import_reference_pkl, load_pact, save_pact
from .taylor import TaylorPredictor
from .transfer import index_positions, positions_from_sigmas, transfer_pact

__version__ = PACK_VERSION
__all__ = [
    "BUDGET_RULES",
    "Budget",
    "Planner",
    "RunPlan",
    "RunShape",
    "index_positions",
    "joint_trajectory",
    "plan_run",
    "prior_cost",
    "positions_from_sigmas",
    "transfer_pact",
    "CacheRun",
    "PactAccumulator",
    "PactFileError",
    "Schedule",
    "SpectralPredictor",
    "spectrum_key_steps",
    "ScheduleMismatchError",
    "TaylorPredictor",
    "TrajectoryRecorder",
    "build_history",
    "build_pact",
    "cost_for",
    "default_max_gap",
    "history_fits",
    "hop_costs_history",
    "import_reference",
    "import_reference_pkl",
    "load_pact",
    "mandatory_steps",
    "parse_key_steps",
    "path_cost",
    "path_cost_history",
    "render_image_rows",
    "render_pact_path",
    "render_timeline",
    "save_pact",
    "solve_schedule",
    "solve_schedule_history",
    "to_comfy_image",
    "uniform_key_steps",
    "write_png",
]
