"""Calibration-free defaults chosen by leave-one-model-out, inside a real ComfyUI.

    COMFYUI_PATH=<ComfyUI> <its python> -m bench.lomo --run --model flux --steps 50 --prompts 5   # fill the table
    ... -m bench.lomo --report                                                                    # the folds: lomo.md

--run measures every candidate plan on one bench model (bench.comfy_compare.MODELS: flux, wan, qwen,
hunyuan) at one step count, on held-out prompts, and stores each prompt's PSNR against the plain run
in bench/results/lomo_runs_<model>_<steps>.json (one entry per model, steps, key steps and forecaster: plans that
coincide are run once, and a re-run skips what is stored). The candidates are a key rule
(DPCache Schedule's `(prior: no calibration)` keeping the last 1, 2 or 3 evaluations as keys, or
Spectrum's own key steps, `spectrum_key_steps`) times a forecaster (spectral, Taylor 1, Taylor 2;
Taylor only where T/K < 4.5, the largest threshold a rule uses).

--report makes the folds by arithmetic over that table: a *rule* is a key rule and a forecaster rule
(spectral where T/K >= a threshold, Taylor of an order below it); for each held-out model the rule
is chosen on the other models (the largest worst-case margin, in mean PSNR, over Spectrum's schedule
with the spectral forecaster at every K and step count; ties: the larger mean margin) and reported on
the held-out one, beside Spectrum's schedule and the best candidate in hindsight.

The stored runs (bench/results/lomo_runs_*.json) were made with the paper's spectral fit, before the
pack's fit became centred (dpcache_core/spectral.py); the run key does not tell the two apart, so move
those files aside before re-measuring with the current fit.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import time

import torch

from bench import comfy_bench as cb
from bench import comfy_compare as cc
from bench import comfy_env

RESULTS = cb.RESULTS
TABLE = os.path.join(RESULTS, "lomo_runs_{model}_{steps}.json")
KS = {50: (9, 13, 17, 25), 30: (6, 8, 10, 15)}
KEY_RULES = ("last 1", "last 2", "last 3", "Spectrum")
FORECASTERS = (("spectral", 2), ("taylor", 1), ("taylor", 2))
#: forecaster rules: spectral where T/K >= threshold, Taylor of that order below (0: spectral everywhere).
#: 2.9 is the rule of "auto" before; at the measured K it splits like any value in (2.0, 2.94].
THRESHOLDS = (0.0, 2.9, 3.4, 4.5)
#: Taylor is measured only where some rule uses it (T/K below the largest threshold): CPU time
TAYLOR_BELOW = max(THRESHOLDS)
FLOOR = ("Spectrum", ("spectral", 2))


def fc_name(fc) -> str:
    return "spectral" if fc[0] == "spectral" else f"Taylor {fc[1]}"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=comfy_env.PACK_DIR, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=comfy_env.PACK_DIR,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def load_table(path: str) -> dict:
    if not os.path.isfile(path):
        return {"runs": {}}
    with open(path) as f:
        return json.load(f)


def load_tables() -> dict:
    """Every stored table (one per model and step count) merged."""
    import glob
    merged = {"runs": {}, "candidates": {}, "commands": {}}
    for path in sorted(glob.glob(TABLE.format(model="*", steps="*"))):
        for part, values in load_table(path).items():
            merged.setdefault(part, {}).update(values)
    return merged


def save_table(table: dict, path: str) -> None:
    cb.write_json(path, table, sort_keys=True)


def plan(key_rule: str, fc, k: int, num_evals: int):
    """The DPCache schedule of a candidate at K = ``k``."""
    predictor, order = fc
    if key_rule == "Spectrum":
        return cc.spectrum_schedule(num_evals, k, predictor, order)
    last = int(key_rule.split()[-1])
    options = {"forecaster": "spectral"} if predictor == "spectral" else {"forecaster": "taylor", "taylor_order": order}
    return cc.prior_schedule(last, k, num_evals, **options)


def run_key(model: str, steps: int, prompts: int, keys, predictor: str, order: int) -> str:
    return f"{model}|{steps}|{prompts}|{','.join(map(str, keys))}|{predictor}|{order if predictor == 'taylor' else '-'}"


def run(args) -> None:
    bench = cb.MODELS[args.model]
    comfy_env.boot(cpu=True, extra_nodes=(cb.flux_detect_fix_dir(),) if bench.detect_fix else ())
    torch.set_num_threads(args.threads)
    prompts = bench.trainer.load_prompts(bench.weights)
    model = cb.load_model(bench.weights, bench)
    held_out = cb.prompt_list(args.prompts, 9000, offset=0)
    num_evals = cb.count_evaluations(model, prompts, bench, args.steps)
    apply = comfy_env.boot()["nodes"]["DPCacheApply"]()
    path = TABLE.format(model=bench.name, steps=args.steps)
    table = load_table(path)
    runs = table["runs"]
    rev = commit()
    t0 = time.perf_counter()
    plain = [cb.sample(model, prompts, cls, seed, args.steps, bench) for cls, seed in held_out]
    ref = cb.decode(model, torch.cat(plain), prompts, bench)
    print(f"{bench.name} {args.steps} steps = {num_evals} evaluations, plain in {time.perf_counter() - t0:.0f}s", flush=True)
    for k in KS.get(args.steps) or args.ks:
        for key_rule, fc in itertools.product(KEY_RULES, FORECASTERS):
            if fc[0] == "taylor" and args.steps / k >= TAYLOR_BELOW:
                continue
            try:
                sched = plan(key_rule, fc, k, num_evals)
            except ValueError as exc:
                print(f"K={k} {key_rule} {fc_name(fc)}: no plan ({exc})", flush=True)
                continue
            name = run_key(bench.name, args.steps, args.prompts, sched.key_steps, sched.predictor, sched.order)
            cand = f"{bench.name}|{args.steps}|{args.prompts}|{k}|{key_rule}|{fc_name(fc)}"
            table.setdefault("candidates", {})[cand] = name
            if name not in runs:
                t1 = time.perf_counter()
                patched = apply.apply(model, sched)["result"][0]
                out = [cb.sample(patched, prompts, cls, seed, args.steps, bench) for cls, seed in held_out]
                img = cb.decode(model, torch.cat(out), prompts, bench)
                runs[name] = {"psnr": [cb.psnr(img[i], ref[i]) for i in range(len(held_out))], "commit": rev,
                              "keys": list(sched.key_steps), "seconds": round(time.perf_counter() - t1, 1)}
                save_table(table, path)
            ps = runs[name]["psnr"]
            print(f"K={k:2d} {key_rule:8s} {fc_name(fc):9s} PSNR {statistics.fmean(ps):6.2f} (worst {min(ps):6.2f})  "
                  f"keys {runs[name]['keys']}", flush=True)
    table.setdefault("commands", {})[f"{bench.name}|{args.steps}|{args.prompts}"] = {
        "command": f"-m bench.lomo --run --model {bench.name} --steps {args.steps} --prompts {args.prompts}", "commit": rev,
        "num_evals": num_evals, "seconds": round(time.perf_counter() - t0)}
    save_table(table, path)
    print(f"done in {time.perf_counter() - t0:.0f}s", flush=True)


# ----------------------------------------------------------------------------------- folds

def measured(table: dict) -> dict:
    """{(model, steps, k, key_rule, forecaster name): (mean, worst)} from the stored runs."""
    out = {}
    for cand, name in table.get("candidates", {}).items():
        model, steps, _prompts, k, key_rule, fc = cand.split("|")
        ps = table["runs"][name]["psnr"]
        out[(model, int(steps), int(k), key_rule, fc)] = (statistics.fmean(ps), min(ps))
    return out


def rules():
    """(key rule, threshold, Taylor order): spectral where T/K >= threshold, Taylor of that order below."""
    seen = []
    for key_rule, thr, order in itertools.product(KEY_RULES, THRESHOLDS, (1, 2)):
        if thr == 0.0 and order == 2:
            continue  # spectral everywhere: the order is never used
        seen.append((key_rule, thr, order))
    return seen


def rule_name(rule) -> str:
    key_rule, thr, order = rule
    keys = "Spectrum's keys" if key_rule == "Spectrum" else f"(prior) {key_rule}"
    if thr == 0.0:
        return f"{keys}, spectral"
    return f"{keys}, spectral at T/K >= {thr:g} else Taylor {order}"


def rule_fc(rule, steps: int, k: int) -> str:
    _key_rule, thr, order = rule
    return "spectral" if steps / k >= thr else f"Taylor {order}"


def cells(data: dict, models) -> list:
    return sorted({(m, s, k) for (m, s, k, _r, _f) in data if m in models})


def score(rule, data: dict, models) -> tuple[float, float] | None:
    """(worst margin, mean margin) of ``rule`` over Spectrum's schedule (mean PSNR, dB) on ``models``;
    None where it has no plan at some cell."""
    margins = []
    for m, s, k in cells(data, models):
        got = data.get((m, s, k, rule[0], rule_fc(rule, s, k)))
        floor = data.get((m, s, k, FLOOR[0], fc_name(FLOOR[1])))
        if got is None or floor is None:
            return None
        margins.append(got[0] - floor[0])
    return (min(margins), statistics.fmean(margins)) if margins else None


def choose(data: dict, models) -> tuple | None:
    scored = [(s, r) for s, r in ((score(r, data, models), r) for r in rules()) if s is not None]
    return max(scored)[1] if scored else None


BEFORE = ("last 3", 2.9, 1)  # the calibration-free default before: (prior) keeping the last 3, forecaster auto


def fmt(v) -> str:
    return "no plan" if v is None else f"{v[0]:.1f} / {v[1]:.1f}"


def best_in_hindsight(data: dict, m: str, s: int, k: int) -> str:
    value, (key_rule, fc) = max((v, (r, f)) for (mm, ss, kk, r, f), v in data.items() if (mm, ss, kk) == (m, s, k))
    keys = "Spectrum's keys" if key_rule == "Spectrum" else f"(prior) {key_rule}"
    return f"{fmt(value)} ({keys}, {fc})"


def combined(table: dict) -> str:
    """One table over every fold: the held-out model, the rule chosen on the others, the default
    before, Spectrum's schedule and the best candidate in hindsight (mean / worst PSNR, dB)."""
    data = measured(table)
    models = sorted({m for (m, *_rest) in data})
    runs = sorted(table.get("commands", {}).values(), key=lambda r: r["command"])
    lines = ["Made by " + "; ".join(f"`{r['command']}` (commit {r['commit']})" for r in runs) +
             "; the folds by `-m bench.lomo --report`.", "",
             "| model held out | steps | K | default: rule chosen on the other three | Spectrum's schedule, our spectral | "
             "(prior) last 3, auto (the default before) | best in hindsight |", "|---|---|---|---|---|---|---|"]
    for held in models:
        rule = choose(data, [m for m in models if m != held])
        for m, s, k in cells(data, [held]):
            got = None if rule is None else data.get((m, s, k, rule[0], rule_fc(rule, s, k)))
            floor = data.get((m, s, k, FLOOR[0], fc_name(FLOOR[1])))
            before = data.get((m, s, k, BEFORE[0], rule_fc(BEFORE, s, k)))
            lines.append(f"| {m} | {s} | {k} | {fmt(got)} | {fmt(floor)} | {fmt(before)} | {best_in_hindsight(data, m, s, k)} |")
    return "\n".join(lines)


def report(table: dict) -> str:
    data = measured(table)
    models = sorted({m for (m, *_rest) in data})
    lines = []
    all_rule = choose(data, models)
    folds = []
    for held in models:
        train = [m for m in models if m != held]
        rule = choose(data, train)
        folds.append((held, rule))
    for held, rule in folds:
        if rule is None:
            lines += [f"**{held} held out**: no rule has a plan at every K on the other models.", ""]
            continue
        runs = [v for c, v in table.get("commands", {}).items() if c.startswith(held + "|")]
        lines += [f"**{held} held out**: rule chosen on {', '.join(m for m in models if m != held)}: {rule_name(rule)}. "
                  "Made by " + "; ".join(f"`{r['command']}`, commit {r['commit']}" for r in runs) + "; folds by "
                  "`-m bench.lomo --report`.", "",
                  "| model held out | steps | K | default (chosen rule) | Spectrum's schedule, our spectral | best in hindsight |",
                  "|---|---|---|---|---|---|"]
        for m, s, k in cells(data, [held]):
            got = data.get((m, s, k, rule[0], rule_fc(rule, s, k)))
            floor = data.get((m, s, k, FLOOR[0], fc_name(FLOOR[1])))
            mark = "" if got is None or floor is None or got[0] >= floor[0] else " **below**"
            lines.append(f"| {m} | {s} | {k} | {fmt(got)}{mark} | {fmt(floor)} | {best_in_hindsight(data, m, s, k)} |")
        lines.append("")
    if all_rule is not None:
        worst, mean = score(all_rule, data, models)
        lines += [f"Rule chosen on all {len(models)} models (what a default would ship): {rule_name(all_rule)} "
                  f"(worst / mean margin over Spectrum's schedule: {worst:+.1f} / {mean:+.1f} dB).", ""]
    lines += ["Every candidate rule on all models (worst / mean margin over Spectrum's schedule, dB):", "",
              "| rule | worst margin | mean margin |", "|---|---|---|"]
    for sc, r in sorted(((score(r, data, models), r) for r in rules()), key=lambda x: x[0] or (-1e9, -1e9), reverse=True):
        if sc is not None:
            lines.append(f"| {rule_name(r)} | {sc[0]:+.1f} | {sc[1]:+.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="store_true", help="measure the candidates on --model at --steps")
    ap.add_argument("--report", action="store_true", help="the leave-one-model-out folds over the stored table")
    ap.add_argument("--model", choices=sorted(cb.MODELS), default="flux")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--ks", type=int, nargs="*", default=None, help="K values at a step count other than 50 and 30")
    ap.add_argument("--prompts", type=int, default=5, help="held-out prompts")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    if a.run:
        run(a)
    if a.report:
        text = combined(load_tables()) + "\n\n" + report(load_tables())
        with open(os.path.join(RESULTS, "lomo.md"), "w") as f:
            f.write(text + "\n")
        print(text)


if __name__ == "__main__":
    main()
