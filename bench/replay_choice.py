"""The forecaster chosen by replay against the best forecaster in hindsight, inside a real ComfyUI.

    COMFYUI_PATH=<ComfyUI> <its python> -m bench.replay_choice --model flux --steps 50 --ks 9 13 17 25 --prompts 6

One trained bench model of ``bench.comfy_compare`` (its sampler, cfg and held-out prompts). DPCache
Calibrate at order 1 (its default) and order 2 on --calib other prompts; then at each K:

- the replay's best candidate of each forecaster (Taylor 1, Taylor 2, spectral, each on the key set
  whose replay was best for it; ``dpcache_core.choose``) on the order-1 file: the choice DPCache
  Schedule's forecaster "auto" makes is one of them;
- the choice when planning and scoring on the --quantile of the per-sample costs and replay errors;
- the replay's choice alone, without the check runs (DPCache Calibrate's check_runs; the chosen row follows them);
- the K sweep's calibrated rows (``comfy_compare``: Taylor 1 on the order-1 PACT, Taylor 2 on the
  order-2 PACT's history-exact costs, spectral on the order-2 PACT).

PSNR against the plain run of the decoded RGB image (the K sweep's measure) and of the final latent
(peak: the plain latent's range), mean and worst over the held-out prompts. "Best in hindsight" is the
best row of the six forecaster rows and the chosen plan (a row of its own when the check runs chose a
plan the replay did not); the gap is best minus chosen. Per forecaster the replayed errors
under both measures of ``choose.MEASURES`` are listed, to see which tracks the PSNR. Writes
bench/results/replay_choice_<model>_<steps>.md.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import tempfile
import time

import torch

from bench import comfy_bench as cb
from bench import comfy_compare as cc
from bench import comfy_env
from bench.choice_reports import check_runs_report, draws_report, rules_report

QUANTILE = 0.9
COMMIT: dict = {}


def latent_psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    mse = torch.mean((out.double() - ref.double()) ** 2).item()
    peak = (ref.max() - ref.min()).item()
    return float("inf") if mse == 0 else 10 * math.log10(peak * peak / mse)


def schedule_of(core, candidate, num_evals: int, family):
    return core.Schedule(tuple(candidate.keys), num_evals, model_family=family, order=candidate.order,
                         source="replay", first_full_steps=3, predictor=candidate.predictor)


def commit() -> str:
    """The short hash of the checkout's HEAD, read once (when the run starts)."""
    if "commit" in COMMIT:
        return COMMIT["commit"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        out = "unknown"
    return COMMIT.setdefault("commit", out)


def run(args) -> dict:
    bench = cb.MODELS[args.model]
    extra = (cb.flux_detect_fix_dir(),) if bench.detect_fix else ()
    env = comfy_env.boot(cpu=True, extra_nodes=extra)
    core = env["core"]
    torch.set_num_threads(args.threads)
    prompts = bench.trainer.load_prompts(bench.weights)
    model = cb.load_model(bench.weights, bench)
    held_out = cb.prompt_list(args.prompts, 9000, offset=0)
    calib = cb.prompt_list(args.calib, 1000, offset=2)
    num_evals = cb.count_evaluations(model, prompts, bench, args.steps)
    ks = tuple(args.ks) if args.ks else cc.compare_ks(args.steps)
    apply = env["nodes"]["DPCacheApply"]()
    plain = [cb.sample(model, prompts, c, s, args.steps, bench) for c, s in held_out]
    plain_rgb = cb.decode(model, torch.cat(plain), prompts, bench)
    measured: dict = {}

    def measure(sched):
        key = (tuple(sched.key_steps), sched.predictor, sched.order if sched.predictor == "taylor" else 0)
        if key not in measured:
            patched = apply.apply(model, sched)["result"][0]
            lat = [cb.sample(patched, prompts, c, s, args.steps, bench) for c, s in held_out]
            rgb = cb.decode(model, torch.cat(lat), prompts, bench)
            ps = [cb.psnr(rgb[i], plain_rgb[i]) for i in range(len(held_out))]
            pl = [latent_psnr(lat[i], plain[i]) for i in range(len(held_out))]
            measured[key] = dict(mean=statistics.fmean(ps), worst=min(ps), latent=statistics.fmean(pl),
                                 latent_worst=min(pl), keys=list(sched.key_steps),
                                 psnrs=[round(x, 3) for x in ps], latents=[round(x, 3) for x in pl])
        return measured[key]

    cells, labels = [], {}
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        orders = (1,) if args.labels_only else (1, 2)
        pacts = {o: cb.calibrate(model, prompts, calib, o, folder, args.steps, bench,
                                 check_runs=args.check_runs if o == 1 else 0) for o in orders}
        print(f"calibrated order(s) {orders} on {len(calib)} prompts in {time.perf_counter() - t0:.0f}s", flush=True)
        acc, meta = core.load_pact(os.path.join(folder, pacts[1]))
        print(f"check runs (PSNR of the final latent, dB): {meta.get('forecaster_checks')}", flush=True)
        for k in ks:
            t1 = time.perf_counter()
            choice = core.choose.replay_choice(acc, meta, k, 3, 0)
            if args.labels_only:  # only the checked labels' plans and the chosen one, per prompt
                chosen = measure(schedule_of(core, choice.best, num_evals, meta.get("model_family")))
                labels[k] = measure_labels(core, acc, meta, k, num_evals, measure, {"chosen": chosen}, "chosen", chosen)
                print(f"K={k}: chosen {choice.best.name} {chosen['mean']:.2f}, labels "
                      f"{ {n: round(v['mean'], 2) for n, v in labels[k].get('labels', {}).items()} }; "
                      f"{time.perf_counter() - t1:.0f}s", flush=True)
                cb.write_json(args.labels_json, dict(model=args.model, steps=args.steps, calib=args.calib,
                                                     check_runs=args.check_runs, prompts=args.prompts, commit=commit(),
                                                     cells=labels))
                continue
            q_choice = core.choose.replay_choice(acc, meta, k, 3, 0, quantile=args.quantile)
            r_choice = core.choose.replay_choice(acc, meta, k, 3, 0, checks=False)  # the replay alone
            alone = measure(schedule_of(core, r_choice.best, num_evals, meta.get("model_family")))
            node = cc.node_schedule(pacts[1], k, num_evals)  # DPCache Schedule's forecaster auto: the choice
            assert node.key_steps == choice.best.keys and node.predictor == choice.best.predictor
            rows = {}
            for name in core.choose.SPEED_ORDER:  # the replay's own plans (the check runs' plans left out)
                cand = min((c for c in r_choice.candidates if c.name == name), key=lambda c: c.error)
                weights = core.choose.step_weights(meta, num_evals)
                scores = {m: float(core.choose.replay_errors(acc.trajectories, cand.keys, name, 3, measure=m,
                                                             weights=weights).mean()) for m in core.choose.MEASURES}
                rows[f"replay's {core.choose.label(name)}"] = dict(
                    measure(schedule_of(core, cand, num_evals, meta.get("model_family"))),
                    db=cand.db, scores=scores, plan=cand.plan)
            for name, sched in cc.sweep_schedules(k, num_evals, pacts, (cc.CAL_O1, cc.CAL_O2, cc.CAL_SPECTRAL)).items():
                rows[name] = measure(sched)
            chosen = measure(schedule_of(core, choice.best, num_evals, meta.get("model_family")))
            if (tuple(choice.best.keys), choice.best.name) not in {
                    (tuple(r["keys"]), n.split("replay's ")[-1].lower()) for n, r in rows.items() if n.startswith("replay's")}:
                rows[f"chosen: {core.choose.label(choice.best.name)}, {choice.best.plan}"] = chosen
            quantile = measure(schedule_of(core, q_choice.best, num_evals, meta.get("model_family")))
            best_name = max(rows, key=lambda n: rows[n]["mean"])
            if args.labels_json:  # every checked label's plan, held out, for studying the rule that picks one
                labels[k] = measure_labels(core, acc, meta, k, num_evals, measure, rows, best_name, chosen)
            cell = dict(k=k, choice=choice, q_choice=q_choice, rows=rows, chosen=chosen, quantile=quantile,
                        r_choice=r_choice, alone=alone,
                        best_name=best_name, best=rows[best_name])
            cells.append(cell)
            print(f"K={k}: chosen {choice.best.name} {chosen['mean']:.2f} ({chosen['worst']:.2f}), best {best_name} "
                  f"{rows[best_name]['mean']:.2f}, quantile {q_choice.best.name} {quantile['mean']:.2f} "
                  f"({quantile['worst']:.2f}), replay alone {r_choice.best.name} {alone['mean']:.2f} ({alone['worst']:.2f}); "
                  f"{time.perf_counter() - t1:.0f}s", flush=True)
            write(args, bench, num_evals, held_out, calib, cells)
            if args.labels_json:
                cb.write_json(args.labels_json, dict(model=args.model, steps=args.steps, cells=labels))
    return dict(cells=cells)


def measure_labels(core, acc, meta, k, num_evals, measure, rows, best_name, chosen) -> dict:
    """{label: its check runs' PSNRs and its plan's held-out PSNR} at K, with the cell's best in hindsight."""
    in_reach = core.check_runs.checks_in_reach(meta, k)
    if not in_reach:
        return {}
    near, means = in_reach[0]
    after = in_reach[1][0] if len(in_reach) > 1 else None  # the next check in reach: it breaks level pairs
    out = {}
    for label in means:
        only = {**meta, "forecaster_checks": {"runs": 1, "ks": {str(near): {label: [0.0]}}}}
        plan = core.choose.replay_choice(acc, only, k, 3, 0).best
        m = measure(schedule_of(core, plan, num_evals, meta.get("model_family")))
        out[label] = dict(check=meta["forecaster_checks"]["ks"][str(near)][label], mean=m["mean"], worst=m["worst"],
                          latent=m["latent"], keys=m["keys"], psnrs=m["psnrs"], latents=m["latents"])
        if after is not None and label in meta["forecaster_checks"]["ks"][str(after)]:
            out[label]["next_check"] = meta["forecaster_checks"]["ks"][str(after)][label]
    every = [*rows.values(), *out.values()]
    return dict(checked_k=near, next_k=after, labels=out, best=max(r["mean"] for r in every), chosen=chosen["mean"],
                best_latent=max(r["latent"] for r in every), chosen_latent=chosen["latent"],
                chosen_psnrs=chosen["psnrs"], chosen_latents=chosen["latents"])


def write(args, bench, num_evals, held_out, calib, cells) -> str:
    lines = [
        f"Command: `<ComfyUI's python> -m bench.replay_choice --model {args.model} --steps {args.steps} --ks "
        f"{' '.join(str(c['k']) for c in cells)} --prompts {args.prompts} --calib {args.calib}"
        f"{'' if args.check_runs == 4 else f' --check-runs {args.check_runs}'}` at commit {commit()} "
        f"(real ComfyUI). Model: {bench.text}; {args.steps} steps = {num_evals} evaluations. {len(held_out)} held-out "
        f"prompts; PACTs from DPCache Calibrate (order 1 with its replay trajectories, and order 2) on {len(calib)} other "
        "prompts. PSNR against the plain run in dB, mean / worst over the prompts: decoded RGB (latent in brackets).",
        "",
        "| model | steps | K | chosen | runner-up (replayed dB) | chosen PSNR mean / worst | best in hindsight | "
        "best PSNR | gap | latent gap | quantile {:g}: choice, mean / worst | replay alone: choice, mean / worst |"
        .format(args.quantile),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        ch, run, best = c["chosen"], c["choice"].runner_up, c["best"]
        runner = f"{cc_label(run.name)} ({run.db:.1f}; chosen {c['choice'].best.db:.1f})" if run else "-"
        lines.append(
            f"| {args.model} | {args.steps} | {c['k']} | {cc_label(c['choice'].best.name)} | {runner} | "
            f"{ch['mean']:.2f} / {ch['worst']:.1f} ({ch['latent']:.1f} / {ch['latent_worst']:.1f}) | {c['best_name']} | "
            f"{best['mean']:.2f} / {best['worst']:.1f} | {best['mean'] - ch['mean']:.2f} | "
            f"{max(r['latent'] for r in c['rows'].values()) - ch['latent']:.2f} | "
            f"{cc_label(c['q_choice'].best.name)}, {c['quantile']['mean']:.1f} / {c['quantile']['worst']:.1f} | "
            f"{cc_label(c['r_choice'].best.name)}, {c['alone']['mean']:.2f} / {c['alone']['worst']:.1f} |")
    lines += ["", "Every forecaster row: PSNR mean / worst (latent mean), and for the replay's candidates the replayed "
              "error under each measure of `choose.MEASURES` (integrated and relative L2 in dB, the PACT's summed "
              "mean-abs error) and the cost that planned the keys:", "",
              "| K | row | PSNR mean / worst | latent | integrated (dB) | rel. L2 (dB) | PACT error | keys planned on | keys |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        for name, r in c["rows"].items():
            sc = r.get("scores")
            extra = (f"{db(sc['integrated'])} | {db(sc['relative L2'])} | {sc['PACT']:.4g} | {r['plan']}" if sc
                     else " | | | ")
            lines.append(f"| {c['k']} | {name} | {r['mean']:.1f} / {r['worst']:.1f} | {r['latent']:.1f} | {extra} | "
                         f"{r['keys']} |")
    lines += ["", f"Machine: {cb.machine_name()}."]
    text = "\n".join(lines)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, f"replay_choice_{args.model}_{args.steps}.md"), "w") as f:
        f.write(text + "\n")
    return text


def db(error: float) -> str:
    return f"{20 * math.log10(max(error, 1e-30)):.1f}"


def cc_label(name: str) -> str:
    return "spectral" if name == "spectral" else name.replace("taylor", "Taylor")


SUMMARY_ROW = re.compile(r"^\| (\w+) \| (\d+) \| (\d+) \| ")
REPLAY_ROW = re.compile(r"^\| (\d+) \| replay's (Taylor \d|spectral) \| ([\d.]+) / ([\d.]+) \| ([\d.]+) \| "
                        r"(-?[\d.]+) \| (-?[\d.]+) \| ([\d.e+-]+) \|")


def summary(out_dir: str) -> str:
    """bench/results/replay_choice.md: every model's choice table in one, the gap per model, and which
    replayed measure picks the forecaster the PSNR picks (from the replay_choice_<model>_<steps>.md files)."""
    table, per_model, picks = [], {}, {m: [] for m in ("integrated", "rel. L2", "PACT")}
    alone_gap, latent_gap = {}, []
    variants: dict = {}
    for name in sorted(os.listdir(out_dir)):
        match = re.fullmatch(r"replay_choice_(\w+)_(\d+)\.md", name)
        if not match:
            continue
        text = open(os.path.join(out_dir, name)).read()
        made = re.search(r"at commit (\w+)", text)[1]
        cells: dict = {}
        for line in text.splitlines():
            if SUMMARY_ROW.match(line):
                c = [x.strip() for x in line.strip().strip("|").split("|")]
                table.append(f"| {' | '.join(c[:5])} | {c[5].split(' (')[0]} | {' | '.join(c[6:9])} | {c[10]} | {made} |")
                for what, cell in (("chosen", c[5].split(" (")[0]), ("best in hindsight", c[7]),
                                   ("quantile 0.9", c[10].split(", ")[1]), ("replay alone", c[11].split(", ")[1])):
                    variants.setdefault(what, []).append([float(x) for x in cell.split(" / ")])
                per_model.setdefault(f"{c[0]} {c[1]}", []).append(float(c[8]))
                alone_gap.setdefault(f"{c[0]} {c[1]}", []).append(
                    float(c[7].split(" / ")[0]) - float(c[11].split(", ")[1].split(" / ")[0]))
                latent_gap.append(float(c[9]))
            row = REPLAY_ROW.match(line)
            if row:
                cells.setdefault(row[1], []).append(dict(psnr=float(row[3]), integrated=float(row[6]),
                                                         **{"rel. L2": float(row[7]), "PACT": float(row[8])}))
        for rows in cells.values():
            best = max(r["psnr"] for r in rows)
            for m in picks:
                picks[m].append(best - min(rows, key=lambda r: r[m])["psnr"])
    gaps = [g for v in per_model.values() for g in v]
    lines = ["Made by `<ComfyUI's python> -m bench.replay_choice --summary` from the per-model files (their commit in "
             "the last column).", "",
             "| model | steps | K | chosen | runner-up (replayed dB; chosen's) | chosen PSNR mean / worst | best in "
             "hindsight | best mean / worst | gap | quantile 0.9: choice, mean / worst | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|"] + table
    alone = [g for v in alone_gap.values() for g in v]
    lines += ["", f"{len(gaps)} cells: the chosen plan within 0.5 dB of the best in hindsight in {sum(g <= 0.5 for g in gaps)} "
              f"(in the final latent's PSNR: {sum(g <= 0.5 for g in latent_gap)}), mean gap {statistics.fmean(gaps):.2f} dB, "
              f"largest {max(gaps):.1f}; the replay alone within 0.5 dB in {sum(g <= 0.5 for g in alone)}, mean gap "
              f"{statistics.fmean(alone):.2f} dB, largest {max(alone):.1f}.", "",
              "| model, steps | chosen: cells within 0.5 dB | mean gap | largest gap | replay alone: within 0.5 dB | mean gap | largest |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {k} | {sum(g <= 0.5 for g in v)} of {len(v)} | {statistics.fmean(v):.2f} | {max(v):.1f} | "
              f"{sum(g <= 0.5 for g in alone_gap[k])} of {len(v)} | {statistics.fmean(alone_gap[k]):.2f} | {max(alone_gap[k]):.1f} |"
              for k, v in per_model.items()]
    lines += ["", "Which replayed error picks the forecaster the PSNR picks (among the replay's three rows of each cell):",
              "", "| measure | cells | the PSNR's best | within 0.5 dB | mean gap (dB) | largest |", "|---|---|---|---|---|---|"]
    lines += [f"| {m} | {len(v)} | {sum(g == 0 for g in v)} | {sum(g <= 0.5 for g in v)} | {statistics.fmean(v):.2f} | "
              f"{max(v):.1f} |" for m, v in picks.items() if v]
    chosen = variants["chosen"]
    lines += ["", "The variants over the same cells (PSNR, dB; worst: each cell's worst prompt):", "",
              "| plan | mean of the means | mean of the worsts | cells where the worst rose / fell against the chosen |",
              "|---|---|---|---|"]
    for what, cells in variants.items():
        up = sum(v[1] > c[1] + 0.05 for v, c in zip(cells, chosen))
        down = sum(v[1] < c[1] - 0.05 for v, c in zip(cells, chosen))
        lines.append(f"| {what} | {statistics.fmean(v[0] for v in cells):.2f} | {statistics.fmean(v[1] for v in cells):.2f} | "
                     f"{up} / {down} |")
    text = "\n".join(lines)
    with open(os.path.join(out_dir, "replay_choice.md"), "w") as f:
        f.write(text + "\n")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(cb.MODELS), default="flux")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--ks", type=int, nargs="*", default=None, help="default: the K sweep's (7..25 of 50, scaled)")
    ap.add_argument("--prompts", type=int, default=6, help="held-out prompts")
    ap.add_argument("--calib", type=int, default=4, help="calibration prompts")
    ap.add_argument("--quantile", type=float, default=QUANTILE)
    ap.add_argument("--check-runs", type=int, default=4, help="DPCache Calibrate's check_runs for the order-1 file "
                    "(4: one per calibration prompt at --calib 4; the node's default is 8); 0 = the replay alone decides")
    ap.add_argument("--labels-json", default=None, help="also measure every checked label's plan; write them here")
    ap.add_argument("--labels-only", action="store_true", help="calibrate order 1 only and measure only the checked "
                    "labels' plans and the chosen one, each prompt kept (needs --labels-json); for --draws")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", default=cb.RESULTS)
    ap.add_argument("--summary", action="store_true", help="only gather the per-model files into replay_choice.md")
    ap.add_argument("--check-runs-of", nargs="+", default=None, help="only compare the pack's choice over --labels-only "
                    "folders made with different --check-runs (the same held-out prompts)")
    ap.add_argument("--draws", default=None, help="only report choices made on n drawn prompts over the --labels-only files in this folder")
    ap.add_argument("--rules", default=None, help="only report the label-picking rules over the --labels-json files in this folder")
    args = ap.parse_args()
    reports = ((args.summary and args.out_dir, summary), (args.rules, rules_report), (args.draws, draws_report),
               (args.check_runs_of, check_runs_report))
    for given, report in reports:  # the reports over result files: nothing is sampled
        if given:
            print(report(given))
            return
    if args.labels_only and not args.labels_json:
        ap.error("--labels-only needs --labels-json FILE (where the per-prompt measurements go)")
    t0 = time.perf_counter()
    commit()
    run(args)
    print(f"wall {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
