"""Choosing the K key steps: the exact DP over a PACT (DESIGN §2), and PACT-free schedules."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .pact import default_max_gap
from .taylor import check_scheme


def check_cost(cost) -> np.ndarray:
    """The cost tensor as float64, checked to be (T, T+1, T+1)."""
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 3 or cost.shape[1] != cost.shape[0] + 1 or cost.shape[2] != cost.shape[0] + 1:
        raise ValueError(f"a PACT must have shape (T, T+1, T+1), got {cost.shape}")
    return cost


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


def prepare(cost, num_keys, first_full_steps, last_full_steps, max_hop, required=()):
    """Checked inputs of a DP: (cost, mandatory steps, hop cap, allowed[c, d] hops)."""
    cost = check_cost(cost)
    num_evals = cost.shape[0]
    mandatory = mandatory_steps(num_evals, first_full_steps, last_full_steps, required)
    check_budget(num_evals, num_keys, mandatory)
    hop = max_hop or default_max_gap(num_evals)
    return cost, mandatory, hop, allowed_hops(num_evals, mandatory, hop)


def solve_schedule(cost, num_keys: int, first_full_steps: int = 3, last_full_steps: int = 0, max_hop: int | None = None,
                   required=()) -> list[int]:
    """The K key steps of least ``path_cost``, solved exactly over (previous key, current key) pairs.

    Every hop (to the next key, and from the last key to the sentinel T) is at most ``max_hop``
    (default max(int(0.3 T), 1)) and skips no mandatory step (``required`` adds mandatory steps).
    Raises ``ValueError`` when no finite schedule exists.
    """
    cost, mandatory, hop, allowed = prepare(cost, num_keys, first_full_steps, last_full_steps, max_hop, required)
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
        raise ValueError(
            f"no schedule with K={num_keys} key steps of T={num_evals} has finite cost "
            f"(hop cap {hop}, first/last full steps {first_full_steps}/{last_full_steps}); raise K or the hop cap"
        )
    prev, cur = np.unravel_index(np.argmin(final), final.shape)
    keys = [int(cur)]
    for choice in reversed(back):
        keys.append(int(prev))
        prev, cur = choice[prev, cur], prev
    return keys[::-1]


def solve_schedule_reference(cost, num_keys: int, first_full_steps: int = 3, last_full_steps: int = 0, max_hop: int | None = None) -> list[int]:
    """The reference implementation's approximate DP, for comparison only.

    It keeps, per (key count, step), only the best predecessor and uses that as the anchor of the
    next hop (and the step before when both are mandatory), so it can miss the optimum.
    """
    cost, mandatory, hop, allowed = prepare(cost, num_keys, first_full_steps, last_full_steps, max_hop)
    num_evals = cost.shape[0]
    is_mandatory = np.zeros(num_evals + 1, dtype=bool)
    is_mandatory[mandatory + [num_evals]] = True
    best = np.full((num_keys + 1, num_evals + 1), np.inf)
    came_from = np.zeros((num_keys + 1, num_evals + 1), dtype=int)
    best[0, 0] = 0.0
    for n in range(1, num_keys + 1):
        for d in range(n, num_evals + 1):
            for c in range(max(n - 1, d - hop), d):
                if not np.isfinite(best[n - 1, c]) or not allowed[c, d]:
                    continue
                if c == 0:
                    anchor = 0
                elif is_mandatory[c] and is_mandatory[c - 1]:
                    anchor = c - 1
                else:
                    anchor = came_from[n - 1, c]
                total = best[n - 1, c] + cost[anchor, c, d]
                if total < best[n, d]:
                    best[n, d], came_from[n, d] = total, c
    if not np.isfinite(best[num_keys, num_evals]):
        raise ValueError(f"the reference DP finds no finite schedule with K={num_keys} of T={num_evals}")
    keys, step = [], num_evals
    for n in range(num_keys, 0, -1):
        step = int(came_from[n, step])
        keys.append(step)
    return keys[::-1]


def path_cost(cost, keys) -> float:
    """Sum over key steps k_m of C[k_{m-1}, k_m, k_{m+1}], with k_{-1} = 0 and k_K = T."""
    cost = check_cost(cost)
    num_evals = cost.shape[0]
    keys = check_key_steps(keys, num_evals)
    padded = [0] + list(keys) + [num_evals]
    return float(sum(cost[padded[m - 1], padded[m], padded[m + 1]] for m in range(1, len(padded) - 1)))


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
    #: How to plan a run with another evaluation count (``replan.Planner``); None: this T only.
    planner: object = field(default=None, repr=False, compare=False)
    key_set: frozenset = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "key_steps", tuple(check_key_steps(self.key_steps, self.num_evals)))
        object.__setattr__(self, "key_set", frozenset(self.key_steps))
        check_scheme(self.scheme)

    @property
    def num_keys(self) -> int:
        return len(self.key_steps)

    @property
    def ideal_speedup(self) -> float:
        """T / K: the speed-up if skipped evaluations cost nothing."""
        return self.num_evals / self.num_keys

    def is_key(self, index: int) -> bool:
        return index in self.key_set

    def describe(self) -> str:
        return (
            f"{self.num_keys} key of {self.num_evals} evaluations (ideal {self.ideal_speedup:.2f}x), "
            f"keys {list(self.key_steps)}"
        )
