"""Planning at sampling start for the run's own evaluation count, and for partial runs.

A ``Schedule`` made by DPCache Schedule is planned at its own T (the PACT's, or
``total_evaluations`` for (uniform)). Its ``planner`` keeps what re-planning needs: the mean cost
tensor, its positions, the budget rule and the first/last full steps. When a sampling run starts,
``plan_run(schedule, RunShape(...))`` returns the schedule that run executes:

- the run makes the schedule's own T evaluations over the whole trajectory: the schedule as it is;
- another count: the PACT transferred to that count (``transfer.transfer_pact``) and solved for
  the budget rule's K; (uniform) is re-spaced at the run's count; (manual) keeps its mismatch error;
- a partial run (a sampling call over a slice of the sigmas: KSamplerAdvanced start/end steps, e.g.
  Wan2.2 A14B's two experts, or denoise < 1): see ``joint_trajectory``.

Other nodes (e.g. a two-expert helper) can call ``plan_run`` with the ``RunShape`` of each call,
or ``joint_trajectory`` + ``Planner.solve_joint`` to inspect the joint plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .runtime import ScheduleMismatchError, mismatch_message
from .schedule import Schedule, mandatory_steps, path_cost, solve_schedule, uniform_key_steps
from .transfer import index_positions, transfer_pact
from . import prior as cost_prior

BUDGET_RULES = ("same speed-up", "target speed-up", "fixed K")
TRANSFERABLE = ("reference", "skip")  # objectives over the (T, T+1, T+1) tensor the transfer rebuilds
EDGE = 1e-3  # positions closer than this to 0 or 1 count as the trajectory's start or end


@dataclass(frozen=True)
class Budget:
    """How many key evaluations a run of T' evaluations gets.

    ``same speed-up``: K at the schedule's T, scaled to round(K T' / T) (default);
    ``target speed-up``: round(T' / speedup); ``fixed K``: K whatever T' is.
    Never fewer than the mandatory keys, never more than T'.
    """

    rule: str = "same speed-up"
    keys: int = 13
    speedup: float = 3.85

    def __post_init__(self):
        if self.rule not in BUDGET_RULES:
            raise ValueError(f"unknown budget rule {self.rule!r}: use one of {', '.join(BUDGET_RULES)}")
        if self.rule == "target speed-up" and not self.speedup >= 1.0:
            raise ValueError(f"target speed-up must be at least 1.0, got {self.speedup}")
        if self.keys < 1:
            raise ValueError(f"K must be at least 1, got {self.keys}")

    def keys_for(self, num_evals: int, own_num_evals: int) -> int:
        if self.rule == "fixed K":
            k = self.keys
        elif self.rule == "target speed-up":
            k = int(round(num_evals / self.speedup))
        else:
            k = int(round(self.keys * num_evals / own_num_evals))
        return max(1, min(k, num_evals))

    def describe(self, own_num_evals: int) -> str:
        if self.rule == "fixed K":
            return f"fixed K={self.keys}"
        if self.rule == "target speed-up":
            return f"target speed-up {self.speedup:g}x"
        return f"same speed-up as K={self.keys} of T={own_num_evals}"


@dataclass(frozen=True)
class RunShape:
    """What a sampling run knows when it starts.

    ``num_evals``: its model evaluations. ``positions``: the normalised trajectory position of each
    of them (0 = sigma_max, 1 = sigma 0; ``transfer.positions_from_sigmas``), or None when
    unknown. ``end``: the position where the run stops (its last sigma; 1.0 when it reaches 0).
    A run with positions[0] > 0 or end < 1 is partial: it samples a window of the trajectory.
    """

    num_evals: int
    positions: tuple | None = None
    end: float = 1.0

    def __post_init__(self):
        if self.positions is not None:
            p = tuple(float(x) for x in self.positions)
            if len(p) != self.num_evals:
                raise ValueError(f"RunShape: {len(p)} positions for {self.num_evals} evaluations")
            object.__setattr__(self, "positions", p)

    @property
    def start(self) -> float:
        return self.positions[0] if self.positions else 0.0

    @property
    def partial(self) -> bool:
        return self.start > EDGE or self.end < 1.0 - EDGE


@dataclass(frozen=True)
class JointTrajectory:
    """The whole trajectory a partial run belongs to, as the run estimates it.

    ``positions``: T_joint + 1 positions (the sentinel last); the run is evaluations
    ``offset .. offset + num_evals - 1`` of it; ``required``: keys every call's schedule must have
    (each call's first ``first_full_steps`` evaluations: the cache never carries between calls).
    """

    positions: tuple
    offset: int
    num_evals: int
    required: tuple

    @property
    def total(self) -> int:
        return len(self.positions) - 1


def joint_trajectory(run: RunShape, first_full_steps: int, span: tuple[float, float] = (0.0, 1.0)) -> JointTrajectory:
    """The trajectory a run belongs to: ``span`` (the part the PACT covers) joined with the run's
    window, the evaluations outside the window estimated from the run's density (evaluations per
    unit of position): exact for the simple and normal schedulers, whose steps are evenly spaced
    in position. Evaluations before the window are evenly spaced from the span's start, those
    after from the window's end. Required keys: the first ``first_full_steps`` evaluations of the
    window, and of the window after it (that call starts afresh too). Positions are absolute.
    """
    n = run.num_evals
    start, end = run.start, run.end
    lo, hi = min(span[0], start), max(span[1], end)
    own = list(run.positions) if run.positions else list(start + (end - start) * np.arange(n) / n)
    density = n / max(end - start, 1e-9)
    before = int(round((start - lo) * density)) if start - lo > EDGE else 0
    after = int(round((hi - end) * density)) if hi - end > EDGE else 0
    positions = ([lo + (start - lo) * k / before for k in range(before)] + own
                 + [end + (hi - end) * k / after for k in range(after)] + [hi])
    total = len(positions) - 1
    starts = [before] + ([before + n] if after else [])
    required = sorted({s + k for s in starts for k in range(max(first_full_steps, 1)) if s + k < total})
    return JointTrajectory(tuple(positions), before, n, tuple(required))


@dataclass(frozen=True)
class RunPlan:
    """What one sampling run executes: its schedule, plus how it was planned (for the report)."""

    schedule: Schedule
    text: str = ""
    joint_keys: tuple = ()
    joint_num_evals: int = 0
    offset: int = 0


@dataclass(frozen=True)
class Planner:
    """Everything a Schedule needs to be planned again for another run.

    ``cost``: the PACT's mean cost tensor (reference convention), None for (uniform).
    ``positions``: the PACT's T+1 normalised positions (per-evaluation sigmas mapped through the
    model's sigma table at calibration), None when unknown (index / T is used).
    """

    num_evals: int
    budget: Budget
    first_full_steps: int = 3
    last_full_steps: int = 0
    cost: np.ndarray | None = field(default=None, repr=False, compare=False)
    positions: tuple | None = None
    order: int = 2
    label: str = ""
    #: (prior): ``cost`` is the calibration-free cost prior at T; other counts are planned on the
    #: prior made afresh from its source (``prior.prior_cost``), not on a transfer of ``cost``.
    prior: bool = False

    def __post_init__(self):
        if self.cost is not None:
            cost = np.array(self.cost, dtype=np.float64)
            cost.setflags(write=False)
            object.__setattr__(self, "cost", cost)
        if self.positions is not None:
            object.__setattr__(self, "positions", tuple(float(p) for p in self.positions))

    @property
    def span(self) -> tuple[float, float]:
        """The part of the trajectory the PACT covers (a PACT recorded on a partial run covers its window)."""
        if self.positions is None:
            return (0.0, 1.0)
        return (self.positions[0], self.positions[-1])

    def cost_for(self, positions) -> np.ndarray:
        """The PACT for a trajectory at these absolute positions (len(positions) - 1 evaluations).

        A PACT without recorded positions is read as evenly spaced over [0, 1]."""
        num_evals = len(positions) - 1
        if self.prior:  # the prior is made at its own T from the shipped PACTs: transfer once from there
            return cost_prior.prior_cost(num_evals, positions)
        if num_evals == self.num_evals:
            return self.cost
        return transfer_pact(self.cost, num_evals, self.order, self.positions, positions)

    def solve(self, positions, num_keys: int, required=(), convention: str = "reference"):
        """(keys, path cost, K used) for a trajectory at ``positions``; K is raised to the smallest
        feasible one when the mandatory keys or the hop cap need more."""
        num_evals = len(positions) - 1
        mandatory = mandatory_steps(num_evals, self.first_full_steps, self.last_full_steps, required)
        cost = self.cost_for(positions)
        extra = {} if convention == "reference" else {"convention": convention}
        for k in range(max(num_keys, len(mandatory)), num_evals + 1):
            try:
                keys = solve_schedule(cost, k, self.first_full_steps, self.last_full_steps, required=required, **extra)
            except ValueError:
                continue
            return keys, path_cost(cost, keys, **extra), k
        raise ValueError(
            f"no finite schedule for a run of {num_evals} evaluations from the {self.label}: calibrate a PACT at "
            f"this step count and sampler, or use a (uniform) schedule"
        )


def schedule_label(schedule: Schedule) -> str:
    planner = schedule.planner
    if planner is not None and planner.label:
        return planner.label
    return f"{schedule.source} schedule for T={schedule.num_evals}"


def plan_run(schedule: Schedule, run: RunShape) -> RunPlan:
    """The schedule a sampling run of shape ``run`` executes (see the module docstring).

    Raises ``ScheduleMismatchError`` for a schedule without a planner ((manual)) whose T is not
    the run's count, with what to change.
    """
    n = run.num_evals
    planner = schedule.planner
    full_span = planner is None or planner.cost is None or planner.span == (0.0, 1.0)
    if n == schedule.num_evals and not run.partial and full_span:
        return RunPlan(schedule, "", schedule.key_steps, n, 0)
    if planner is None:
        raise ScheduleMismatchError(mismatch_message(n, schedule.num_evals))
    label = schedule_label(schedule)
    budget = planner.budget
    rule = budget.describe(planner.num_evals)
    if planner.cost is None:  # (uniform): evenly spaced over this call's own evaluations
        k = max(budget.keys_for(n, planner.num_evals), len(mandatory_steps(n, planner.first_full_steps, planner.last_full_steps)))
        keys = uniform_key_steps(n, k, planner.first_full_steps, planner.last_full_steps)
        text = f"{label}; planned for T={n}: {len(keys)} key evaluations ({rule}), keys {keys}"
        return RunPlan(replace(schedule, key_steps=tuple(keys), num_evals=n, planner=None), text, tuple(keys), n, 0)
    convention = getattr(schedule, "convention", None) or "reference"
    if convention == "history":  # the history-exact tensor does not transfer: the skip-only reading does
        convention = "skip"
    if convention not in TRANSFERABLE:
        raise ValueError(
            f"a schedule planned with the {convention!r} objective cannot be re-planned for this run of {n} "
            f"evaluations (only {' and '.join(TRANSFERABLE)} PACTs transfer): calibrate at this step count "
            f"and sampler, or use a (uniform) schedule"
        )
    joint = joint_trajectory(run, planner.first_full_steps, planner.span)
    positions = joint.positions
    if run.positions is None or planner.positions is None:  # no sigmas on one side: index / T
        positions = tuple(index_positions(joint.total))
    k = budget.keys_for(joint.total, planner.num_evals)
    keys, cost, used = planner.solve(positions, k, joint.required, convention)
    raised = "" if used == k else f" (raised from {k}: the fewest this run allows)"
    if joint.total == n:
        text = f"{label}; planned for T={n}: {len(keys)} key evaluations{raised} ({rule}), keys {keys}"
        sched = replace(schedule, key_steps=tuple(keys), num_evals=n, cost=cost, planner=None)
        return RunPlan(sched, text, tuple(keys), n, 0)
    mine = [key - joint.offset for key in keys if joint.offset <= key < joint.offset + n]
    text = (f"{label}; this call is evaluations {joint.offset}..{joint.offset + n - 1} of an estimated "
            f"T={joint.total} trajectory (positions {run.start:.2f}..{run.end:.2f}); joint plan {len(keys)} key "
            f"evaluations{raised} ({rule}), keys {keys}; this call computes {len(mine)} of {n}: {mine}")
    sched = replace(schedule, key_steps=tuple(mine), num_evals=n, cost=None, last_full_steps=0, planner=None)
    return RunPlan(sched, text, tuple(keys), joint.total, joint.offset)
