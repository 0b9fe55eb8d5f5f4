"""Planning at sampling start for the run's own evaluation count, and for partial runs.

A ``Schedule`` made by DPCache Schedule is planned at its own T (the PACT's, or
``total_evaluations`` for (uniform)). Its ``planner`` keeps what re-planning needs: the mean cost
tensor, its positions, the budget rule and the first/last full steps. When a sampling run starts,
``plan_run(schedule, RunShape(...))`` returns the schedule that run executes:

- the run makes the schedule's own T evaluations over the whole trajectory: the schedule as it is;
- another count, or the same count at other positions (another scheduler: its sigmas put the
  evaluations elsewhere on the trajectory): the PACT transferred to the run's positions
  (``transfer.transfer_pact``) and solved for the budget rule's K; (uniform) is re-spaced at the
  run's count (``uniform_plan``: the hop cap holds, K raised when it needs more, and a partial run
  gets one joint plan like a PACT's); (manual) keeps its mismatch error;
- a partial run (a sampling call over a slice of the sigmas: KSamplerAdvanced start/end steps, e.g.
  Wan2.2 A14B's two experts, or denoise < 1): see ``joint_trajectory``.

Other nodes (e.g. a two-expert helper) can call ``plan_run`` with the ``RunShape`` of each call,
or ``joint_trajectory`` + ``Planner.solve_joint`` to inspect the joint plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .runtime import ScheduleMismatchError, mismatch_message
from .pact import default_max_gap
from .schedule import Schedule, mandatory_steps, path_cost, solve_schedule, uniform_key_steps
from .transfer import index_positions, transfer_pact
from . import prior as cost_prior
from .spectrum_keys import spectrum_key_steps

BUDGET_RULES = ("same speed-up", "target speed-up", "fixed K")
TRANSFERABLE = ("reference", "skip")  # objectives over the (T, T+1, T+1) tensor the transfer rebuilds
EDGE = 1e-3  # positions closer than this to 0 or 1 count as the trajectory's start or end
SAME_POSITIONS = 0.25  # positions within this many evaluation spacings (1/T) count as the same sigmas


def starts_trajectory(positions) -> bool:
    """True when evaluations at these normalised positions start the trajectory (not a window).

    The first position is at 0 (within ``EDGE``), or it is less than one of the run's own steps from
    0 on evenly spaced positions: ComfyUI's ddim_uniform takes every stride-th entry of the sigma
    table counted from its low end, so its first sigma sits below sigma_max by less than a stride
    (position 0.018 at 50 steps), yet no evaluation fits before it. A window of an evenly spaced
    run (KSamplerAdvanced from step s >= 1) starts s whole steps in.
    """
    if not positions:
        return True
    p = np.asarray(positions[:6], dtype=np.float64)
    if p[0] <= EDGE:
        return True
    if len(p) < 3:
        return False
    gaps = np.diff(p)
    even = bool(np.all(gaps > 0)) and np.allclose(gaps, gaps[0], rtol=1e-3, atol=1e-7)
    return even and p[0] < gaps[0] * (1 - 1e-4)


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

    def window_keys(self, run_evals: int, own_num_evals: int) -> int | None:
        """The keys a partial run (a window of a longer trajectory) should compute among its own
        ``run_evals`` evaluations: K scaled to them by the rule's ratio (the same speed-up as a whole
        run); None for fixed K (K counts over the whole trajectory)."""
        return None if self.rule == "fixed K" else self.keys_for(run_evals, own_num_evals)

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
    A run with positions[0] > 0 (``starts_trajectory``) or end < 1 is partial: it samples a window
    of the trajectory.
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
    def whole_start(self) -> bool:
        """The run starts the trajectory (``starts_trajectory``)."""
        return starts_trajectory(self.positions)

    @property
    def partial(self) -> bool:
        return not self.whole_start or self.end < 1.0 - EDGE


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
    before = int(round((start - lo) * density)) if start - lo > EDGE and not run.whole_start else 0
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
    #: prior made afresh from its source (``prior.prior_cost``), not on a transfer of ``cost``, with
    #: its kept-last rule (``prior.solve_prior``); ``last_full_steps`` is then the typed minimum.
    prior: bool = False
    #: (spectrum): no cost; every count is planned with Spectrum's own key steps (``spectrum_plan``).
    spectrum: bool = False

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
        return (0.0 if starts_trajectory(self.positions[:-1]) else self.positions[0], self.positions[-1])

    def same_positions(self, positions, by_sigma: bool = True) -> bool:
        """True when a trajectory at ``positions`` (T+1, the sentinel last) is the PACT's own: the same
        count and, ``by_sigma``, each evaluation within a quarter of a step of the PACT's."""
        if len(positions) - 1 != self.num_evals:
            return False
        if self.positions is None or not by_sigma:
            return True
        diff = np.abs(np.asarray(positions, dtype=np.float64) - np.asarray(self.positions, dtype=np.float64))
        return float(diff.max()) <= SAME_POSITIONS / self.num_evals

    def cost_for(self, positions, by_sigma: bool = True) -> np.ndarray:
        """The PACT for a trajectory at these absolute positions (len(positions) - 1 evaluations).

        A PACT without recorded positions is read as evenly spaced over [0, 1]. ``by_sigma`` False:
        the positions are index / T (the run's sigmas are unknown), so only the count is compared."""
        if self.prior:  # the prior is made at its own T from the shipped PACTs: transfer once from there
            return cost_prior.prior_cost(len(positions) - 1, positions)
        if self.same_positions(positions, by_sigma):
            return self.cost
        return transfer_pact(self.cost, len(positions) - 1, self.order, self.positions, positions)

    def solve(self, positions, num_keys: int, required=(), convention: str = "reference", by_sigma: bool = True):
        """(keys, path cost, K used) for a trajectory at ``positions``; K is raised to the smallest
        feasible one when the mandatory keys or the hop cap need more."""
        num_evals = len(positions) - 1
        mandatory = mandatory_steps(num_evals, self.first_full_steps, self.last_full_steps, required)
        cost = self.cost_for(positions, by_sigma)
        extra = {} if convention == "reference" else {"convention": convention}
        for k in range(max(num_keys, len(mandatory)), num_evals + 1):
            try:
                if self.prior:  # the prior's kept-last rule: fewer last keys where k cannot afford them
                    keys, _ = cost_prior.solve_prior(cost, k, self.first_full_steps, self.last_full_steps, required,
                                                     convention)
                else:
                    keys = solve_schedule(cost, k, self.first_full_steps, self.last_full_steps, required=required, **extra)
            except ValueError:
                continue
            return keys, path_cost(cost, keys, **extra), k
        raise ValueError(
            f"no finite schedule for a run of {num_evals} evaluations from the {self.label}: calibrate a PACT at "
            f"this step count and sampler, or use a (uniform) schedule"
        )


def uniform_plan(num_evals: int, num_keys: int, first_full_steps: int = 3, last_full_steps: int = 0,
                 required=(), max_hop: int | None = None) -> tuple[list[int], int]:
    """(keys, K used): the mandatory and ``required`` keys plus the others evenly spaced between them,
    no hop (the last one to the sentinel T included) longer than the hop cap (default
    max(int(0.3 T), 1)); K is raised to the fewest that allows it. Without ``required`` keys and
    without a raise it is ``uniform_key_steps``.

    Each stretch between two mandatory keys (or the last one and T) gets the extra keys its length
    needs under the cap, then the rest go one by one to the stretch with the longest hops.
    """
    mandatory = mandatory_steps(num_evals, first_full_steps, last_full_steps, required)
    cap = max_hop or default_max_gap(num_evals)
    ends = mandatory + [num_evals]
    stretches = [(a, b) for a, b in zip(ends, ends[1:]) if b - a > 1]
    extra = [-(-(b - a) // cap) - 1 for a, b in stretches]  # ceil(length / cap) - 1 keys inside each
    used = min(max(num_keys, len(mandatory) + sum(extra)), num_evals)
    if not required and used == num_keys:
        return uniform_key_steps(num_evals, used, first_full_steps, last_full_steps), used
    for _ in range(used - len(mandatory) - sum(extra)):
        n = max(range(len(stretches)), key=lambda m: (stretches[m][1] - stretches[m][0]) / (extra[m] + 1))
        extra[n] += 1
    keys = set(mandatory)
    for (a, b), e in zip(stretches, extra):
        keys.update(int(np.round(a + (b - a) * m / (e + 1))) for m in range(1, e + 1))
    return sorted(keys), used


def spectrum_plan(num_evals: int, num_keys: int, first_full_steps: int = 3, last_full_steps: int = 0,
                  required=()) -> list[int]:
    """Spectrum's key steps (``spectrum_key_steps``: warm-up round(T / 10), growing windows, a tail of
    up to 3) with a warm-up of at least ``first_full_steps`` and a tail of at least ``last_full_steps``,
    plus the ``required`` keys (the first evaluations of a partial run's windows)."""
    warmup = max(1, round(num_evals / 10), int(first_full_steps))
    tail = int(last_full_steps) if last_full_steps > 3 else None
    keys = spectrum_key_steps(num_evals, max(int(num_keys), min(warmup + (tail or 1), num_evals)), warmup=warmup, tail=tail)
    return sorted(set(keys) | {int(r) for r in required if 0 <= r < num_evals})


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
    by_sigma = run.positions is not None and planner is not None and planner.positions is not None
    same = planner is None or planner.cost is None or not by_sigma or planner.same_positions(
        tuple(run.positions) + (run.end,))
    if n == schedule.num_evals and not run.partial and full_span and same:
        return RunPlan(schedule, "", schedule.key_steps, n, 0)
    if planner is None:
        raise ScheduleMismatchError(mismatch_message(n, schedule.num_evals))
    label = schedule_label(schedule)
    budget = planner.budget
    rule = budget.describe(planner.num_evals)
    if planner.cost is None:  # (uniform): evenly spaced over the run, or over the joint trajectory of a partial run
        joint = joint_trajectory(run, planner.first_full_steps) if run.partial else None
        total = joint.total if joint else n
        k = budget.keys_for(total, planner.num_evals)

        def fixed(k):
            """The entry's own key rule (Spectrum's or evenly spaced) for k keys on the whole trajectory."""
            last = planner.last_full_steps if joint is None else 0
            required = joint.required if joint else ()
            if planner.spectrum:
                keys = spectrum_plan(total, k, planner.first_full_steps, last, required)
                return keys, len(keys)
            return uniform_plan(total, k, planner.first_full_steps, last, required)

        keys, used = fixed(k)
        if joint is not None:
            (keys, used), k, note = sized_for_window(fixed, k, joint, budget.window_keys(n, planner.num_evals))
            return executed(schedule, label, rule, run, joint, keys, note or raised_note(k, used, total), None)
        return executed(schedule, label, rule, run, joint, keys, raised_note(k, used, total), None)
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
    if not by_sigma:  # no sigmas on one side: index / T
        positions = tuple(index_positions(joint.total))
    k = budget.keys_for(joint.total, planner.num_evals)

    def solve(k):
        keys, cost, used = planner.solve(positions, k, joint.required, convention, by_sigma)
        return keys, used, cost

    keys, used, cost = solve(k)
    if joint.total != n or run.partial:
        (keys, used, _), k, note = sized_for_window(solve, k, joint, budget.window_keys(n, planner.num_evals))
        return executed(schedule, label, rule, run, joint, keys, note or raised_note(k, used, joint.total), None)
    if n == planner.num_evals:  # the same count at other sigmas: the PACT re-mapped onto the run's positions
        label += "; this run's sigmas put its evaluations elsewhere on the trajectory, so it is re-mapped by sigma"
    return executed(schedule, label, rule, run, None, keys, raised_note(k, used, n), cost)


def sized_for_window(solve, k: int, joint: JointTrajectory, want: int | None):
    """(plan, K asked, note): the joint plan ``solve(k)`` (keys first, K used second) whose keys inside
    the run's window (``joint.offset`` .. + ``joint.num_evals``) are ``want``, the budget's share of the
    evaluations the run computes (``Budget.window_keys``): the joint K raised or lowered until the window
    holds that many, or as near as the window's mandatory keys and the hop cap allow. ``want`` None
    (fixed K): the plan of ``k`` as it is. The note says what the window got."""
    plan = solve(k)
    if want is None:
        return plan, k, ""

    def inside(p):
        return sum(joint.offset <= key < joint.offset + joint.num_evals for key in p[0])

    if inside(plan) < want:
        for more in range(plan[1] + 1, joint.total + 1):
            plan, k = solve(more), more
            if inside(plan) >= want:
                break
    while inside(plan) > want and plan[1] > 1:
        fewer = solve(plan[1] - 1)
        if fewer[1] >= plan[1] or inside(fewer) < want:
            break
        plan, k = fewer, plan[1] - 1
    got = inside(plan)
    why = "" if got == want else (f"; {got}, not {want}: the fewest the call's first keys and the hop cap allow"
                                  if got > want else f"; {got}, not {want}: the most the joint plan places there")
    return plan, k, f" (the joint K sized so that this call computes the budget's share of its {joint.num_evals} evaluations, {want}{why})"


def raised_note(asked: int, used: int, num_evals: int) -> str:
    """" (raised from K: ...)" when the plan needed more keys than the budget asked for, else ""."""
    if used == asked:
        return ""
    return (f" (raised from {asked}: the fewest the mandatory steps and the hop cap {default_max_gap(num_evals)} "
            f"allow at T={num_evals})")


def executed(schedule: Schedule, label: str, rule: str, run: RunShape, joint, keys, raised: str, cost) -> RunPlan:
    """The RunPlan of a run: the whole plan, or this call's part of a joint plan (``joint``)."""
    n = run.num_evals
    if joint is None or joint.total == n and not run.partial:
        text = f"{label}; planned for T={n}: {len(keys)} key evaluations{raised} ({rule}), keys {keys}"
        sched = replace(schedule, key_steps=tuple(keys), num_evals=n, cost=cost, planner=None)
        return RunPlan(sched, text, tuple(keys), n, 0)
    mine = [key - joint.offset for key in keys if joint.offset <= key < joint.offset + n]
    text = (f"{label}; this call is evaluations {joint.offset}..{joint.offset + n - 1} of an estimated "
            f"T={joint.total} trajectory (positions {run.start:.2f}..{run.end:.2f}); joint plan {len(keys)} key "
            f"evaluations{raised} ({rule}), keys {keys}; this call computes {len(mine)} of {n}: {mine}")
    sched = replace(schedule, key_steps=tuple(mine), num_evals=n, cost=None, last_full_steps=0, planner=None)
    return RunPlan(sched, text, tuple(keys), joint.total, joint.offset)
