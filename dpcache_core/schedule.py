"""Choosing the K key steps: the exact DP over a PACT (DESIGN §2), and PACT-free schedules."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .history import check_history
from .pact import default_max_gap
from .taylor import check_scheme, derivatives_after_for

# How a PACT's hop cost C[a, i, j] is read (DESIGN §2, issue 11):
# "reference": the paper's cost, prediction error at t = i+1 .. j, so it counts the next key j
#   although j is computed at run time (a schedule of every step still costs something);
# "skip": only the evaluations actually skipped, t = i+1 .. j-1 (C'[a, i, j] = C[a, i, j-1]),
#   the hop to the sentinel T unchanged. Derived from the stored reference tensor; no new calibration.
CONVENTIONS = ("reference", "skip")


def check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown cost convention {convention!r}: use one of {', '.join(CONVENTIONS)}")
    return convention


def check_cost(cost) -> np.ndarray:
    """The cost tensor as float64, checked to be (T, T+1, T+1)."""
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 3 or cost.shape[1] != cost.shape[0] + 1 or cost.shape[2] != cost.shape[0] + 1:
        raise ValueError(f"a PACT must have shape (T, T+1, T+1), got {cost.shape}")
    return cost


def skip_only_cost(cost) -> np.ndarray:
    """The "skip" reading of a reference-convention PACT: C'[a, i, j] = C[a, i, j-1] for j < T.

    C'[a, i, i+1] = 0 (nothing skipped), C'[a, i, T] = C[a, i, T] (the sentinel hop is unchanged);
    entries the reference leaves undefined (+inf) stay undefined.
    """
    cost = check_cost(cost)
    num_evals = cost.shape[0]
    out = np.full_like(cost, np.inf)
    out[:, :, 1:num_evals] = cost[:, :, : num_evals - 1]
    steps = np.arange(num_evals)
    out[:, steps, steps + 1] = 0.0
    out[:, :, num_evals] = cost[:, :, num_evals]
    out[~np.isfinite(cost)] = np.inf
    return out


def cost_for(cost, convention: str = "reference") -> np.ndarray:
    """The checked cost tensor as the DP reads it under ``convention``."""
    cost = check_cost(cost)
    return skip_only_cost(cost) if check_convention(convention) == "skip" else cost


def mandatory_steps(num_evals: int, first_full_steps: int, last_full_steps: int, required=()) -> list[int]:
    """Steps that must be key steps: 0, the first ``first_full_steps``, the last ``last_full_steps``
    and any ``required`` ones (e.g. where a partial sampling run starts)."""
    if first_full_steps < 0 or last_full_steps < 0:
        raise ValueError(f"first/last full steps must be >= 0, got {first_full_steps} and {last_full_steps}")
    steps = {0} | set(range(min(first_full_steps, num_evals))) | set(range(max(num_evals - last_full_steps, 0), num_evals))
    extra = {int(k) for k in required}
    if any(k < 0 or k >= num_evals for k in extra):
        raise ValueError(f"required key steps {sorted(extra)} must lie in 0..{num_evals - 1}")
    return sorted(steps | extra)


def check_budget(num_evals: int, num_keys: int, mandatory: list[int]) -> None:
    if num_keys > num_evals:
        raise ValueError(f"K={num_keys} key steps is more than the T={num_evals} evaluations of the run")
    if num_keys < len(mandatory):
        raise ValueError(
            f"K={num_keys} key steps is fewer than the {len(mandatory)} mandatory ones "
            f"(first/last full steps); raise K or lower first_full_steps/last_full_steps"
        )


def allowed_hops(num_evals: int, mandatory: list[int], max_hop: int) -> np.ndarray:
    """allowed[c, d]: a hop from key c to key (or sentinel) d is within the cap and skips no mandatory step."""
    next_mandatory = np.full(num_evals, num_evals)
    upcoming = num_evals
    is_mandatory = np.zeros(num_evals, dtype=bool)
    is_mandatory[mandatory] = True
    for c in range(num_evals - 1, -1, -1):
        next_mandatory[c] = upcoming
        if is_mandatory[c]:
            upcoming = c
    c = np.arange(num_evals)[:, None]
    d = np.arange(num_evals + 1)[None, :]
    return (d > c) & (d - c <= max_hop) & (d <= next_mandatory[:, None])


def prepare(cost, num_keys, first_full_steps, last_full_steps, max_hop, required=(), convention="reference"):
    """Checked inputs of a DP: (cost under ``convention``, mandatory steps, hop cap, allowed[c, d] hops)."""
    cost = cost_for(cost, convention)
    num_evals = cost.shape[0]
    mandatory = mandatory_steps(num_evals, first_full_steps, last_full_steps, required)
    check_budget(num_evals, num_keys, mandatory)
    hop = max_hop or default_max_gap(num_evals)
    return cost, mandatory, hop, allowed_hops(num_evals, mandatory, hop)


def solve_schedule(cost, num_keys: int, first_full_steps: int = 3, last_full_steps: int = 0, max_hop: int | None = None,
                   required=(), convention: str = "reference") -> list[int]:
    """The K key steps of least ``path_cost`` under ``convention``, solved exactly over (previous key, current key) pairs.

    Every hop (to the next key, and from the last key to the sentinel T) is at most ``max_hop``
    (default max(int(0.3 T), 1)) and skips no mandatory step (``required`` adds mandatory steps).
    Raises ``ValueError`` when no finite schedule exists.
    """
    cost, mandatory, hop, allowed = prepare(cost, num_keys, first_full_steps, last_full_steps, max_hop, required, convention)
    num_evals = cost.shape[0]
    step_cost = np.where(allowed[None], cost[:, :num_evals, :], np.inf)  # [prev, cur, next]
    # best[p, c]: least cost of a partial schedule whose last two keys are p, c (p = 0 for the first key).
    best = np.full((num_evals, num_evals), np.inf)
    best[0, 0] = 0.0
    back = []
    for _ in range(num_keys - 1):
        total = best[:, :, None] + step_cost[:, :, :num_evals]  # [p, c, d]
        back.append(np.argmin(total, axis=0))  # best p for each (c, d)
        best = np.min(total, axis=0)
    final = best + step_cost[:, :, num_evals]
    if not np.isfinite(final).any():
        raise no_schedule_error(num_keys, num_evals, hop, first_full_steps, last_full_steps, step_cost)
    prev, cur = np.unravel_index(np.argmin(final), final.shape)
    keys = [int(cur)]
    for choice in reversed(back):
        keys.append(int(prev))
        prev, cur = choice[prev, cur], prev
    return keys[::-1]


def no_schedule_error(num_keys, num_evals, hop, first_full_steps, last_full_steps, step_cost, kind="") -> ValueError:
    """The error for a K with no finite schedule, naming the smallest K that works."""
    return ValueError(
        f"no schedule with K={num_keys} key steps of T={num_evals} has finite {kind}cost "
        f"(hop cap {hop}, first/last full steps {first_full_steps}/{last_full_steps}); "
        f"{feasible_advice(step_cost, num_keys)}"
    )


def feasible_advice(step_cost: np.ndarray, num_keys: int) -> str:
    """What to tell a user whose K has no finite schedule: the smallest K that works, if any."""
    feasible = feasible_key_counts(step_cost)
    larger = [k for k in feasible if k > num_keys]
    if larger:
        return f"the smallest K that works is {larger[0]}"
    if feasible:
        return f"K={feasible[0]} works"
    return "no K works: the PACT has too few finite entries; calibrate it again"


def feasible_key_counts(step_cost: np.ndarray) -> list[int]:
    """Every K for which some schedule has finite cost, given step_cost[prev, cur, next] (+inf = not allowed)."""
    num_evals = step_cost.shape[0]
    finite = np.isfinite(step_cost)
    reach = np.zeros((num_evals, num_evals), dtype=bool)  # reach[p, c]: the last two keys can be p, c
    reach[0, 0] = True
    counts = []
    for num_keys in range(1, num_evals + 1):
        if (reach & finite[:, :, num_evals]).any():
            counts.append(num_keys)
        reach = (reach[:, :, None] & finite[:, :, :num_evals]).any(axis=0)
        if not reach.any():
            break
    return counts


def path_cost(cost, keys, convention: str = "reference") -> float:
    """Sum over key steps k_m of C[k_{m-1}, k_m, k_{m+1}], with k_{-1} = 0 and k_K = T, C read under ``convention``."""
    cost = cost_for(cost, convention)
    num_evals = cost.shape[0]
    keys = check_key_steps(keys, num_evals)
    padded = [0] + list(keys) + [num_evals]
    return float(sum(cost[padded[m - 1], padded[m], padded[m + 1]] for m in range(1, len(padded) - 1)))


def history_start(num_evals: int, scheme: str, first_full_steps: int) -> int:
    """The key step where the run's Taylor history starts: 0, or the last mandatory key at which
    the reference scheme still resets its derivatives (``first_full_steps - 2``)."""
    after = derivatives_after_for(scheme, first_full_steps)
    return min(max(after, 0), num_evals - 1) if after is not None else 0


def solve_schedule_history(history, num_keys: int, first_full_steps: int = 3, last_full_steps: int = 0,
                           max_hop: int | None = None, scheme: str = "reference") -> list[int]:
    """The K key steps of least ``path_cost_history``: the exact DP over the last order+1 keys.

    ``history``: a tensor from ``dpcache_core.history.build_history`` (order m, hop cap H). The
    state after a key is that key and the m gaps back to the keys the run's predictor holds;
    T * (H+1)^m states, H transitions each. Hops obey the cap and the mandatory steps as in
    ``solve_schedule``; ``max_hop`` defaults to, and may not exceed, the tensor's H.
    """
    history, order, cap = check_history(history)
    num_evals = history.shape[0]
    hop = max_hop or cap
    if hop > cap:
        raise ValueError(f"hop cap {hop} is more than the {cap} the history cost tensor was calibrated for; lower it")
    mandatory = mandatory_steps(num_evals, first_full_steps, last_full_steps)
    check_budget(num_evals, num_keys, mandatory)
    allowed = allowed_hops(num_evals, mandatory, hop)
    start = history_start(num_evals, scheme, first_full_steps)  # keys 0 .. start are mandatory
    states = (cap + 1) ** order
    older = states // (cap + 1)  # states once the oldest gap is dropped
    step_cost = history.reshape(num_evals, states, cap)
    best = np.full((num_evals, states), np.inf)
    best[start, 0] = step_cost[:start, 0, 0].sum()  # hops of one step (nothing skipped); no history yet
    back = []
    for _ in range(num_keys - start - 1):
        new = np.full_like(best, np.inf)
        came = np.zeros(best.shape, dtype=np.int64)
        for h in range(1, min(hop, num_evals - 1) + 1):
            ok = np.where(allowed[: num_evals - h, h:num_evals].diagonal(), 0.0, np.inf)
            total = (best[: num_evals - h] + step_cost[: num_evals - h, :, h - 1] + ok[:, None]).reshape(-1, older, cap + 1)
            new[h:, h * older : (h + 1) * older] = total.min(axis=2)
            came[h:, h * older : (h + 1) * older] = total.argmin(axis=2)
        back.append(came)
        best = new
    final = np.full_like(best, np.inf)
    for i in range(max(num_evals - hop, 0), num_evals):
        if allowed[i, num_evals]:
            final[i] = best[i] + step_cost[i, :, num_evals - i - 1]
    if not np.isfinite(final).any():
        hops_only = np.broadcast_to(np.where(allowed, 0.0, np.inf), (num_evals, *allowed.shape))
        raise no_schedule_error(num_keys, num_evals, hop, first_full_steps, last_full_steps, hops_only, "history-exact ")
    key, state = np.unravel_index(np.argmin(final), final.shape)
    keys = [int(key)]
    for came in reversed(back):
        gap = state // older
        state, key = (state % older) * (cap + 1) + came[key, state], key - gap
        keys.append(int(key))
    return list(range(start)) + keys[::-1]


def hop_costs_history(history, keys, first_full_steps: int = 3, scheme: str = "reference") -> list[float]:
    """The history-exact cost of each key's hop: the hop's cost given the keys the run's predictor
    holds there (reset at key steps up to ``first_full_steps - 2`` for the reference scheme);
    +inf for a hop longer than the tensor's cap."""
    history, order, cap = check_history(history)
    num_evals = history.shape[0]
    keys = check_key_steps(keys, num_evals)
    after = derivatives_after_for(scheme, first_full_steps)
    padded = keys + [num_evals]
    gaps: list[int] = []
    costs = []
    for m, key in enumerate(keys):
        if m == 0 or (after is not None and key <= after):
            gaps = []
        else:
            gaps = ([key - keys[m - 1]] + gaps)[:order]
        hop = padded[m + 1] - key
        if hop > cap or any(g > cap for g in gaps):
            costs.append(float("inf"))
        else:
            costs.append(float(history[(key, *gaps, *[0] * (order - len(gaps)), hop - 1)]))
    return costs


def path_cost_history(history, keys, first_full_steps: int = 3, scheme: str = "reference") -> float:
    """The history-exact cost of ``keys``: the sum of ``hop_costs_history``."""
    return float(sum(hop_costs_history(history, keys, first_full_steps, scheme)))


def check_key_steps(keys, num_evals: int) -> list[int]:
    """Key steps as a sorted list starting at 0, all below ``num_evals``; else a clear ValueError."""
    keys = [int(k) for k in keys]
    if not keys or keys[0] != 0:
        raise ValueError(f"key steps must start with evaluation 0, got {keys[:5]}")
    if any(b <= a for a, b in zip(keys, keys[1:])):
        raise ValueError(f"key steps must be strictly increasing, got {keys}")
    if keys[-1] >= num_evals:
        raise ValueError(f"key step {keys[-1]} is out of range for T={num_evals} evaluations (0..{num_evals - 1})")
    return keys


def uniform_key_steps(num_evals: int, num_keys: int, first_full_steps: int = 3, last_full_steps: int = 0) -> list[int]:
    """The mandatory steps plus the other key steps evenly spaced between them (TaylorSeer-style)."""
    mandatory = mandatory_steps(num_evals, first_full_steps, last_full_steps)
    check_budget(num_evals, num_keys, mandatory)
    start = max(first_full_steps, 1) - 1  # last step of the leading block of full steps
    end = num_evals - last_full_steps if last_full_steps else num_evals
    extra = num_keys - len(mandatory)
    spacing = (end - start) / (extra + 1)
    spread = {int(np.round(start + m * spacing)) for m in range(1, extra + 1)}
    return sorted(set(mandatory) | spread)


def parse_key_steps(text: str, num_evals: int) -> list[int]:
    """Key steps typed by a user, e.g. "0, 1, 2, 5, 9-11" (ranges inclusive); 0 is added if absent."""
    keys: set[int] = set()
    for token in filter(None, re.split(r"[\s,;]+", text.strip())):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", token)
        if not match:
            raise ValueError(f"cannot read key step {token!r}: write numbers like '0, 1, 2, 5, 9-11'")
        lo = int(match.group(1))
        hi = int(match.group(2) or lo)
        if hi < lo:
            raise ValueError(f"range {token!r} runs backwards")
        keys.update(range(lo, hi + 1))
    if not keys:
        raise ValueError("no key steps given: type a list such as '0, 1, 2, 5, 9, 14'")
    return check_key_steps(sorted(keys | {0}), num_evals)


# Forecasters a Schedule can ask for at skipped evaluations (runtime.CacheRun builds them).
PREDICTORS = ("taylor", "spectral")


# Planning conventions a Schedule records, in words ("history": skip-only, history-exact order >= 2).
PLANNING = {
    "reference": "reference costs",
    "skip": "skip-only costs",
    "history": "history-exact skip-only costs",
}


@dataclass(frozen=True)
class Schedule:
    """Which evaluations of a sampling run are computed in full (immutable: it flows between nodes)."""

    key_steps: tuple[int, ...]
    num_evals: int
    model_family: str | None = None
    order: int = 2
    scheme: str = "reference"
    source: str = "manual"
    cost: float | None = None
    first_full_steps: int = 3
    last_full_steps: int = 0
    convention: str | None = None  # the cost that planned it: "reference", "skip", "history"; None without a PACT
    predictor: str = "taylor"  # the forecaster at skipped evaluations: "taylor" (of ``order``) or "spectral"
    #: How to plan a run with another evaluation count (``replan.Planner``); None: this T only.
    planner: object = field(default=None, repr=False, compare=False)
    key_set: frozenset = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "key_steps", tuple(check_key_steps(self.key_steps, self.num_evals)))
        object.__setattr__(self, "key_set", frozenset(self.key_steps))
        check_scheme(self.scheme)
        if self.predictor not in PREDICTORS:
            raise ValueError(f"unknown forecaster {self.predictor!r}: use one of {', '.join(PREDICTORS)}")
        if self.convention not in (None, *PLANNING):
            raise ValueError(f"unknown planning convention {self.convention!r}: use one of {', '.join(PLANNING)}")

    @property
    def num_keys(self) -> int:
        return len(self.key_steps)

    @property
    def ideal_speedup(self) -> float:
        """T / K: the speed-up if skipped evaluations cost nothing."""
        return self.num_evals / self.num_keys

    def is_key(self, index: int) -> bool:
        return index in self.key_set

    @property
    def planned_by(self) -> str:
        """How the key steps were chosen, in words: e.g. "pact:x.safetensors, skip-only costs"."""
        if self.convention is None:
            return self.source
        return f"{self.source}, {PLANNING[self.convention]}"

    def describe(self) -> str:
        return (
            f"{self.num_keys} key of {self.num_evals} evaluations (ideal {self.ideal_speedup:.2f}x), "
            f"keys {list(self.key_steps)}" + (f", planned with {PLANNING[self.convention]}" if self.convention else "")
            + (", spectral forecaster" if self.predictor == "spectral" else "")
        )
