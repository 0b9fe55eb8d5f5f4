"""The forecaster and key steps chosen from the data: each candidate replayed on recorded trajectories.

A PACT file from this version's DPCache Calibrate (or the automatic mode) keeps a few replay
trajectories (``replay``). ``replay_choice`` plans K key steps with the DP on every cost it can
build (the file's own cost, its history-exact cost, and the order-1 and order-2 skip-only costs
built from the trajectories), then replays Taylor 1, Taylor 2 and the spectral forecaster on every
key set those plans propose, with the run's own code (``runtime.CacheRun``) on the recorded
trajectories, and keeps the candidate of least replayed error.

Replayed error of one trajectory ("integrated", ``replay_errors``): the prediction errors of the
skipped evaluations summed with each evaluation's step in sigma, as the sampler sums the model's
outputs, ||sum_t w_t (predicted_t - recorded_t)||, over sum_t w_t ||recorded_t||. On the bench it
ranks the forecasters as the final PSNR does; the mean relative L2 error per skipped evaluation and
the PACT's summed mean-abs error ranked them the other way round (BENCHMARKS.md). The score of a
candidate is its mean over the trajectories (or a quantile of them, ``quantile``). Candidates whose
scores lie within ``TIE_DB`` of the best are a tie, and the fastest forecaster of them wins
(``SPEED_ORDER``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from .check_runs import HISTORY_PLAN, checks_in_reach, forecaster_of
from .history import build_history, history_fits
from .pact import build_pact, default_max_gap
from .runtime import CacheRun
from .schedule import Schedule, mandatory_steps, path_cost, solve_schedule, solve_schedule_history

# Forecasters, fastest first: the cache's own time per run at the same K measured by
# `python -m bench.speed --forecasters` (bench/results/speed_forecasters.md): Taylor 1 updates one
# float32 factor per key and sums two tensors per skipped evaluation, Taylor 2 one more of each, the
# spectral forecaster sums up to 8 kept features.
SPEED_ORDER = ("taylor 1", "taylor 2", "spectral")
FORECASTERS = {"taylor 1": ("taylor", 1), "taylor 2": ("taylor", 2), "spectral": ("spectral", 1)}
TIE_DB = 0.3  # replayed errors within this many dB (error ratio 10^(0.3/20)) count as level
# check runs' mean PSNRs within this many dB count as level (the rule chosen by leave-one-model-out
# at 8 check runs over 0, 0.3 and 1 dB and the median or worst run: BENCHMARKS.md section 14)
CHECK_TIE_DB = 0.5
PLAN_QUANTILE = None  # plan and score on the mean over samples (a quantile was tried: BENCHMARKS.md)
COST_ELEMENTS = 8192  # elements of the trajectories a cost is built on (the build's time grows with them)
TRAJECTORY_HISTORY = "history-exact costs of the trajectories"  # what planned a check label's history-exact keys
REFINE = False  # refine each forecaster's best key set by replay (``refine``; tried: BENCHMARKS.md)


@dataclass(frozen=True)
class Candidate:
    """One forecaster on one key set, with its replayed error."""

    name: str  # "taylor 1", "taylor 2" or "spectral"
    keys: tuple
    plan: str  # the cost the DP planned the keys on
    error: float  # the score over trajectories (mean, or the quantile)
    per_sample: tuple = ()

    @property
    def predictor(self) -> str:
        return FORECASTERS[self.name][0]

    @property
    def order(self) -> int:
        return FORECASTERS[self.name][1]

    @property
    def db(self) -> float:
        return 20 * math.log10(max(self.error, 1e-30))


@dataclass(frozen=True)
class Choice:
    """The chosen candidate, the best of another forecaster, and every candidate replayed."""

    best: Candidate
    runner_up: Candidate | None
    candidates: tuple
    samples: int
    checked: tuple | None = None  # (K checked, {label: mean PSNR dB}, chosen label, runner-up label) when check runs decided
    next_check: tuple | None = None  # (the next K checked, the level label it put second) when it broke a tie

    def describe(self) -> str:
        best = self.best
        if self.checked is not None:
            k, means, chosen, runner = self.checked
            text = (f"forecaster chosen by the calibration's check runs at K={k}: {label(chosen)} "
                    f"({means[chosen]:.1f} dB PSNR of the final latent; keys planned on {best.plan})")
            if self.next_check is not None:
                after, level = self.next_check
                text += f"; level with {label(level)} ({means[level]:.1f} dB), the check at K={after} measured it better"
            if runner is not None:
                text += f"; runner-up {label(runner)} ({means[runner]:.1f} dB)"
            return text
        text = (f"forecaster chosen by replay on {self.samples} recorded trajector{'y' if self.samples == 1 else 'ies'}: "
                f"{label(best.name)} (replayed error {best.db:.1f} dB, keys planned on {best.plan})")
        if self.runner_up is not None:
            text += f"; runner-up {label(self.runner_up.name)} ({self.runner_up.db:.1f} dB)"
        return text


def label(name: str) -> str:
    """How the node writes a forecaster (or a check's label): "Taylor 1", "spectral"."""
    return name.replace("taylor", "Taylor")


MEASURES = ("integrated", "relative L2", "PACT")


def step_weights(meta: dict, num_evals: int) -> np.ndarray:
    """Each evaluation's step in sigma, sigma_t - sigma_{t+1}, from the file's ``eval_sigmas`` (T + 1
    values); 1 / T each when the file has none."""
    sigmas = meta.get("eval_sigmas") if meta else None
    if isinstance(sigmas, list) and len(sigmas) == num_evals + 1:
        steps = -np.diff(np.asarray(sigmas, dtype=np.float64))
        if np.isfinite(steps).all() and (steps >= 0).all() and steps.sum() > 0:
            return steps
    return np.full(num_evals, 1.0 / num_evals)


def replay_errors(trajectories, keys, name: str, first_full_steps: int = 3, scheme: str = "reference",
                  measure: str = "integrated", weights=None) -> np.ndarray:
    """Per trajectory, the replayed error of forecaster ``name`` on ``keys``: the run's own ``CacheRun``
    fed the recorded cache points at the keys, its predictions compared with the recorded ones.
    ``trajectories``: (n, T, elements); the forecast is element-wise, so all n go as one batch.

    ``measure``: "integrated" (default): ||sum_t w_t (predicted_t - recorded_t)|| / sum_t w_t
    ||recorded_t||, the errors summed with each evaluation's step in sigma ``weights`` (1 / T each by
    default) as the sampler sums the model's outputs, so errors of one sign add up and errors that
    alternate cancel; "relative L2": the mean over skipped evaluations of ||predicted - recorded|| /
    ||recorded||; "PACT": the PACT's own error, mean |predicted - recorded| / 2 summed over them."""
    traj = torch.as_tensor(np.asarray(trajectories), dtype=torch.float32)
    n, num_evals, _ = traj.shape
    w = torch.as_tensor(np.full(num_evals, 1.0 / num_evals) if weights is None else np.asarray(weights), dtype=torch.float64)
    predictor, order = FORECASTERS[name]
    run = CacheRun(Schedule(tuple(keys), num_evals, order=order, scheme=scheme, source="replay",
                            first_full_steps=first_full_steps, predictor=predictor))
    total, skipped = torch.zeros(n, dtype=torch.float64), 0
    summed = torch.zeros(traj.shape[0], traj.shape[2], dtype=torch.float64)
    for t in range(num_evals):
        if run.start_evaluation():
            run.update("replay", traj[:, t])
            continue
        target = traj[:, t]
        predicted = run.predict("replay")
        skipped += 1
        if measure == "integrated":
            summed += w[t] * (predicted - target).double()
        elif measure == "PACT":
            total += (predicted - target).abs().mean(dim=1).double() / 2
        else:
            error = torch.linalg.vector_norm(predicted - target, dim=1)
            total += (error / torch.linalg.vector_norm(target, dim=1).clamp_min(1e-12)).double()
    run.close()
    if measure == "integrated":
        whole = torch.einsum("t,nt->n", w, torch.linalg.vector_norm(traj.double(), dim=2)).clamp_min(1e-12)
        return (torch.linalg.vector_norm(summed, dim=1) / whole).numpy()
    if measure == "PACT":
        return total.numpy()
    return (total / max(skipped, 1)).numpy()


def side_by_side(trajectories, elements: int = COST_ELEMENTS) -> tuple[np.ndarray, int]:
    """((T, n x per) float array: the n trajectories side by side, ``per`` leading elements of each,
    at most ``elements`` in all (a random pick, ``replay``), per): a cost built on it is the mean of
    the n trajectories' costs."""
    traj = np.asarray(trajectories)
    per = max(1, min(traj.shape[2], elements // len(traj)))
    return np.concatenate(list(traj[:, :, :per]), axis=1), per


def trajectory_cost(trajectories, order: int, quantile: float | None = None,
                    elements: int = COST_ELEMENTS) -> np.ndarray:
    """The reference-convention PACT of Taylor ``order`` built from the trajectories (``side_by_side``):
    the mean over them, or their ``quantile`` entry by entry."""
    joined, per = side_by_side(trajectories, elements)
    if quantile is None:
        return build_pact(torch.as_tensor(joined), order=order, scheme="reference")
    traj = np.asarray(trajectories)
    costs = np.stack([build_pact(torch.as_tensor(t[:, :per]), order=order, scheme="reference") for t in traj])
    out = np.full(costs.shape[1:], np.inf)
    finite = np.isfinite(costs).all(axis=0)
    out[finite] = np.quantile(costs[:, finite], quantile, axis=0)
    return out


def trajectory_history_plan(trajectories, num_keys: int, first_full_steps: int, last_full_steps: int = 0,
                            elements: int = COST_ELEMENTS) -> list[int] | None:
    """The K key steps of least order-2 history-exact cost built from the trajectories
    (``side_by_side``; a few seconds at T = 50); None when its tensor would not fit or no plan is finite."""
    joined, _ = side_by_side(trajectories, elements)
    if not history_fits(joined.shape[0], 2):
        return None
    try:
        return solve_schedule_history(build_history(torch.as_tensor(joined), order=2, scheme="reference"), num_keys,
                                      first_full_steps, last_full_steps)
    except ValueError:
        return None


def candidate_plans(trajectories, num_keys: int, first_full_steps: int, last_full_steps: int, cost=None,
                    order: int = 1, convention: str = "skip", history=None, scheme: str = "reference",
                    quantile: float | None = None) -> dict[str, list[int]]:
    """{what planned it: keys} of the DP at K = ``num_keys`` on each cost: the file's own ``cost``
    (Taylor ``order``, read under ``convention``) and ``history`` (history-exact) when given and
    planning on the mean, and the skip-only costs of Taylor 1 and 2 built from the trajectories
    (the file's own order only for a ``quantile``). A cost without a finite plan at K is left out."""
    solvers = {}
    if cost is not None and quantile is None:
        solvers[f"the PACT's order-{order} costs"] = lambda: solve_schedule(
            cost, num_keys, first_full_steps, last_full_steps, convention=convention)
    if history is not None and quantile is None:
        solvers["the PACT's history-exact costs"] = lambda: solve_schedule_history(
            history, num_keys, first_full_steps, last_full_steps, scheme=scheme)
    for o in (1, 2):
        if o != order or cost is None or quantile is not None:
            what = f"order-{o} costs of the trajectories" + (f" (quantile {quantile:g})" if quantile is not None else "")
            solvers[what] = lambda o=o: solve_schedule(trajectory_cost(trajectories, o, quantile), num_keys,
                                                       first_full_steps, last_full_steps, convention="skip")
    plans = {}
    for what, solve in solvers.items():
        try:
            plans[what] = solve()
        except ValueError:
            continue
    return plans


def pick(candidates, tie_db: float = TIE_DB) -> tuple[Candidate, Candidate | None]:
    """(chosen, runner-up): of the candidates within ``tie_db`` of the least error, the fastest
    forecaster's best; the runner-up is the best candidate of another forecaster."""
    least = min(c.error for c in candidates)
    level = [c for c in candidates if c.error <= least * 10 ** (tie_db / 20)]
    best = min(level, key=lambda c: (SPEED_ORDER.index(c.name), c.error))
    others = [c for c in candidates if c.name != best.name]
    return best, min(others, key=lambda c: c.error) if others else None


def fastest_level(scores: dict, tie_db: float = CHECK_TIE_DB, next_check: dict | None = None) -> str:
    """Of the labels ({label: score, higher is better}) within ``tie_db`` of the best score, the
    fastest forecaster's (``SPEED_ORDER``); among equally fast ones, the one the next check in reach
    ``next_check`` ({label: score}) measured better when it measured them all, else the better scored."""
    top = max(scores.values())
    level = [label for label in scores if scores[label] >= top - tie_db]
    fastest = min(SPEED_ORDER.index(forecaster_of(x)) for x in level)
    tied = [x for x in level if SPEED_ORDER.index(forecaster_of(x)) == fastest]
    after = next_check or {}
    if len(tied) > 1 and all(x in after for x in tied):
        return max(tied, key=lambda x: (after[x], scores[x]))
    return max(tied, key=lambda x: scores[x])


def pick_checked(choice: Choice, checked: tuple, planned: dict | None = None, next_check: tuple | None = None) -> Choice:
    """``choice`` decided by check runs (``check_runs.checked_ranking``: {label: mean PSNR}, a label
    naming a forecaster and how its keys are planned): of the labels whose measured PSNR lies within
    ``CHECK_TIE_DB`` of the best, the fastest forecaster's (two of it level: the one the next checked K
    in reach, ``next_check`` = (K, {label: mean PSNR}), measured better), on the key set ``planned`` gives the label
    ({label: keys}: the history-exact plan) or else the forecaster's replay-best key set; the
    runner-up is the best measured label of another forecaster. ``choice`` itself when no checked
    forecaster is a candidate."""
    k, means = checked
    planned = planned or {}
    options = {}
    for label in means:
        name = forecaster_of(label)
        of_name = [c for c in choice.candidates if c.name == name]
        if label in planned:
            of_name = [c for c in of_name if c.keys == planned[label]]
        else:  # the replay's own plans only: not a history-exact plan added for another label
            of_name = [c for c in of_name if c.plan != TRAJECTORY_HISTORY]
        if of_name:
            options[label] = min(of_name, key=lambda c: c.error)
    if not options:
        return choice
    scores = {x: means[x] for x in options}
    by_score = fastest_level(scores)
    label = fastest_level(scores, next_check=next_check[1]) if next_check else by_score
    others = sorted((x for x in options if forecaster_of(x) != forecaster_of(label)), key=lambda x: -means[x])
    return replace(choice, best=options[label], runner_up=options[others[0]] if others else None,
                   checked=(k, scores, label, others[0] if others else None),
                   next_check=(next_check[0], by_score) if label != by_score else None)


def refine(keys, score, num_evals: int, fixed, max_hop: int | None = None, rounds: int = 4):
    """(keys, score): ``keys`` improved by moving one free key (not in ``fixed``) one evaluation
    earlier or later while ``score(keys)`` drops, every hop (the last one to T included) within the
    hop cap; at most ``rounds`` passes over the keys."""
    cap = max_hop or default_max_gap(num_evals)
    keys, best = tuple(keys), score(tuple(keys))
    for _ in range(rounds):
        improved = False
        for m in range(len(keys)):
            for move in (-1, 1):
                new = keys[m] + move
                if keys[m] in fixed or new in keys or not 0 < new < num_evals:
                    continue
                trial = tuple(sorted(keys[:m] + (new,) + keys[m + 1:]))
                if max(np.diff(trial + (num_evals,))) > cap:
                    continue
                value = score(trial)
                if value < best:
                    keys, best, improved = trial, value, True
                    break
        if not improved:
            break
    return keys, best


def choose(trajectories, plans: dict, first_full_steps: int = 3, scheme: str = "reference",
           quantile: float | None = None, names=SPEED_ORDER, measure: str = "integrated", weights=None,
           fixed=None) -> Choice:
    """Replay every forecaster of ``names`` on every distinct key set of ``plans`` and pick (``pick``).
    ``fixed``: with it, each forecaster's best key set is then refined by replay (``refine``), the
    keys in ``fixed`` (the mandatory ones) staying."""
    if not plans:
        raise ValueError("no key set to replay: no cost has a finite plan at this K")
    distinct: dict[tuple, str] = {}
    for what, keys in plans.items():
        distinct.setdefault(tuple(int(k) for k in keys), what)
    def summary(keys, name):
        per = replay_errors(trajectories, keys, name, first_full_steps, scheme, measure, weights)
        return float(per.mean() if quantile is None else np.quantile(per, quantile))

    candidates = []
    for keys, what in distinct.items():
        for name in names:
            per = replay_errors(trajectories, keys, name, first_full_steps, scheme, measure, weights)
            score = float(per.mean() if quantile is None else np.quantile(per, quantile))
            candidates.append(Candidate(name, keys, what, score, tuple(float(x) for x in per)))
    if fixed is not None:
        for name in names:
            start = min((c for c in candidates if c.name == name), key=lambda c: c.error)
            keys, _ = refine(start.keys, lambda k: summary(k, name), trajectories.shape[1], set(fixed))
            if keys != start.keys:
                per = replay_errors(trajectories, keys, name, first_full_steps, scheme, measure, weights)
                candidates.append(Candidate(name, keys, start.plan + ", refined by replay", float(
                    per.mean() if quantile is None else np.quantile(per, quantile)), tuple(float(x) for x in per)))
    best, runner = pick(candidates)
    return Choice(best, runner, tuple(candidates), len(trajectories))


def replay_choice(acc, meta: dict, num_keys: int, first_full_steps: int = 3, last_full_steps: int = 0,
                  quantile: float | None = PLAN_QUANTILE, refined: bool = REFINE, checks: bool = True) -> Choice | None:
    """The data's choice for a PACT file (``PactAccumulator``, metadata) at K = ``num_keys``; None
    when the file keeps no replay trajectories or holds windows of partial runs (plan as before).
    The file's check runs (``check_runs``) at a K near ``num_keys`` decide when it has them
    (``checks``): the label they measured best, its keys planned its way on the file as it is now."""
    trajectories = getattr(acc, "trajectories", None)
    if trajectories is None or not len(trajectories) or meta.get("windows"):
        return None
    order, scheme = int(meta.get("order", 1)), meta.get("scheme", "reference")
    convention = meta.get("convention", "reference")
    history = acc.history_mean() if convention == "skip" and order >= 2 else None
    plans = candidate_plans(trajectories, num_keys, first_full_steps, last_full_steps, acc.mean(), order,
                            convention, history, scheme, quantile)
    fixed = mandatory_steps(trajectories.shape[1], first_full_steps, last_full_steps) if refined else None
    weights = step_weights(meta, trajectories.shape[1])
    choice = choose(trajectories, plans, first_full_steps, scheme, quantile, weights=weights, fixed=fixed)
    in_reach = checks_in_reach(meta, num_keys) if checks else []
    if not in_reach:
        return choice
    checked = in_reach[0]
    next_check = in_reach[1] if len(in_reach) > 1 else None
    planned = {}
    if any(label.endswith(HISTORY_PLAN) for label in checked[1]):
        keys = trajectory_history_plan(trajectories, num_keys, first_full_steps, last_full_steps)
        if keys is not None:
            planned = {label: tuple(keys) for label in checked[1] if label.endswith(HISTORY_PLAN)}
    known = {(c.name, c.keys) for c in choice.candidates}
    extra = {(forecaster_of(label), keys): Candidate(forecaster_of(label), keys, TRAJECTORY_HISTORY,
                                                     float(replay_errors(trajectories, keys, forecaster_of(label),
                                                                         first_full_steps, scheme, weights=weights).mean()))
             for label, keys in planned.items() if (forecaster_of(label), keys) not in known}
    return pick_checked(replace(choice, candidates=choice.candidates + tuple(extra.values())), checked, planned,
                        next_check)


def replayed_schedule(schedule: Schedule, acc, meta: dict, quantile: float | None = PLAN_QUANTILE):
    """(``schedule`` with the keys, forecaster and Taylor order the data chose, the ``Choice``) at the
    schedule's own T and K; (``schedule``, None) when the file keeps no replay trajectories. The
    schedule's planner (re-planning for other counts) stays the file's."""
    choice = replay_choice(acc, meta, schedule.num_keys, schedule.first_full_steps, schedule.last_full_steps, quantile)
    if choice is None:
        return schedule, None
    best = choice.best
    if best.plan.endswith("history-exact costs"):
        convention = "history"
    elif best.plan.startswith("the PACT's"):
        convention = meta.get("convention", "reference")
    else:
        convention = "skip"
    cost = path_cost(acc.mean(), best.keys, "reference" if convention == "reference" else "skip")
    return replace(schedule, key_steps=best.keys, predictor=best.predictor, order=best.order, convention=convention,
                   cost=cost), choice
