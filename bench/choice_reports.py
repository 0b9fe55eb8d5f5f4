"""Reports over bench.replay_choice's label files (no ComfyUI needed): how each rule that picks a
label from the check runs fares held out (``rules_report``), the pack's choice with each number of
check runs (``check_runs_report``) and how far a choice made on a few prompts can get
(``draws_report``). Run through ``python -m bench.replay_choice --rules / --check-runs-of / --draws``.
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics

from dpcache_core.choose import CHECK_TIE_DB, fastest_level


# the rules tried for picking a label from the check runs; DPCache Schedule's first
RULES = (("mean", CHECK_TIE_DB),) + tuple(rule for rule in (("mean", 0.0), ("mean", 0.3), ("mean", 0.5), ("mean", 1.0), (
    "median", 0.3), ("worst", 0.3)) if rule != ("mean", CHECK_TIE_DB))


def rule_pick(labels: dict, rule: tuple) -> str:
    """The label a rule picks from the check runs' PSNRs: the best score (mean, median or worst of the
    check runs); labels within the rule's dB of it are level and the fastest forecaster's wins (two of
    it level: the better at the next check in reach, when the file kept it)."""
    kind, tie = rule
    statistic = {"mean": statistics.fmean, "median": statistics.median, "worst": min}[kind]
    score = {label: statistic(v["check"]) for label, v in labels.items()}
    after = {label: statistic(v["next_check"]) for label, v in labels.items() if v.get("next_check")}
    return fastest_level(score, tie, after or None)


def rules_report(folder: str) -> str:
    """bench/results/replay_choice_rules.md from the --labels-json files in ``folder``: how each rule
    that picks a label from the check runs fares held out, the rule chosen by leave-one-model-out, and
    the best label in hindsight (the ceiling of any such rule)."""
    cells = {}
    for name in sorted(os.listdir(folder)):
        if re.fullmatch(r"labels_\w+_\d+\.json", name):
            d = json.load(open(os.path.join(folder, name)))
            cells.setdefault(d["model"], []).extend(c for c in d["cells"].values() if c)

    def gaps(models, rule):
        return [c["best"] - c["labels"][rule_pick(c["labels"], rule)]["mean"] for m in models for c in cells[m]]

    def line(what, g):
        return f"| {what} | {sum(x <= 0.5 for x in g)} of {len(g)} | {statistics.fmean(g):.2f} | {max(g):.1f} |"

    models = sorted(cells)
    out = ["| rule (score of the check runs, level within) | cells within 0.5 dB | mean gap | largest |", "|---|---|---|---|"]
    out += [line(f"{kind}, {tie} dB" + (" (DPCache Schedule's)" if (kind, tie) == RULES[0] else ""), gaps(models, (kind, tie)))
            for kind, tie in RULES]
    held = []
    fold_lines = ["", "| model held out | rule chosen on the other three | cells within 0.5 dB | mean gap |", "|---|---|---|---|"]
    for model in models:
        others = [m for m in models if m != model]
        rule = max(RULES, key=lambda r: (sum(x <= 0.5 for x in gaps(others, r)), -statistics.fmean(gaps(others, r))))
        g = gaps([model], rule)
        held += g
        fold_lines.append(f"| {model} | {rule[0]}, {rule[1]} dB | {sum(x <= 0.5 for x in g)} of {len(g)} | {statistics.fmean(g):.2f} |")
    ceiling = [c["best"] - max(v["mean"] for v in c["labels"].values()) for m in models for c in cells[m]]
    out += fold_lines + [
        "", f"Leave-one-model-out, all folds: {sum(x <= 0.5 for x in held)} of {len(held)} cells within 0.5 dB, mean gap "
        f"{statistics.fmean(held):.2f}. The best label in hindsight (the ceiling of any rule that picks one): "
        f"{sum(x <= 0.5 for x in ceiling)} of {len(ceiling)} cells within 0.5 dB, mean gap {statistics.fmean(ceiling):.2f}."]
    return "\n".join(out)


def per_prompt_cells(folder: str) -> list:
    """(file, K, cell) of every cell of the --labels-only files in ``folder`` (each prompt's PSNR kept)."""
    cells = []
    for name in sorted(os.listdir(folder)):
        if re.fullmatch(r"labels_\w+_\d+\.json", name):
            d = json.load(open(os.path.join(folder, name)))
            cells += [(d, int(k), c) for k, c in d["cells"].items() if c and "psnrs" in next(iter(c["labels"].values()))]
    return cells


def pack_gap(cell: dict) -> tuple[str, str, float, float]:
    """(the label the check runs chose, the best label over the held-out prompts, the gap between their
    mean decoded PSNRs, the paired standard error of that gap)."""
    labels = cell["labels"]
    best = max(labels, key=lambda n: statistics.fmean(labels[n]["psnrs"]))
    diff = [b - a for a, b in zip(cell["chosen_psnrs"], labels[best]["psnrs"])]
    se = statistics.stdev(diff) / math.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    picked = next((n for n in labels if labels[n]["psnrs"] == cell["chosen_psnrs"]), "replay's plan")
    return picked, best, statistics.fmean(diff), se


def check_runs_report(folders: list[str]) -> str:
    """The pack's choice in each --labels-only folder (one per number of check runs, or per version of
    the checks; the same held-out prompts), per model: cells within 0.5 dB of the best label, mean gap,
    cells whose gap lies more than two standard errors above 0.5 dB; and the folder chosen by
    leave-one-model-out (the first of equals). A folder named by its number of check runs shows as
    "<n> check runs", another by its name."""
    runs, commits, prompts = {}, set(), set()
    for folder in folders:
        cells = per_prompt_cells(folder)
        if cells:
            name = os.path.basename(os.path.normpath(folder))
            n = cells[0][0]["check_runs"]
            runs[f"{n} check runs" if name == str(n) else name] = {
                (d["model"], d["steps"], k): pack_gap(c)[2:] for d, k, c in cells}
            commits |= {d["commit"] for d, _, _ in cells}
            prompts |= {d["prompts"] for d, _, _ in cells}
    counts = list(runs)
    shared = sorted(set.intersection(*(set(r) for r in runs.values())))
    models = sorted({m for m, _, _ in shared})

    def score(count, among):
        gaps = [runs[count][c] for c in shared if c[0] in among]
        return (sum(g <= 0.5 for g, _ in gaps), -statistics.fmean(g for g, _ in gaps), len(gaps),
                sum(g - 2 * se > 0.5 for g, se in gaps))

    out = [f"Made by `<ComfyUI's python> -m bench.replay_choice --labels-only --model <m> --steps <s> --ks <K...> --prompts "
           f"{'/'.join(map(str, sorted(prompts)))} --calib <n> --check-runs <n> --labels-json <folder>/labels_<m>_<s>.json` "
           f"in each folder at {', '.join(sorted(commits))}, then `--check-runs-of <folders>`. "
           "Gap: the best checked label's mean decoded PSNR over the held-out prompts minus the chosen plan's; a clear "
           "miss: a gap more than two paired standard errors above 0.5 dB.", "",
           "| model | " + " | ".join(f"{n}: within 0.5 dB / mean gap / clear misses" for n in counts) + " |",
           "|---|" + "---|" * len(counts)]
    for model in models + ["all"]:
        among = models if model == "all" else [model]
        out.append(f"| {model} | " + " | ".join(
            f"{s[0]} of {s[2]} / {-s[1]:.2f} / {s[3]}" for s in (score(n, among) for n in counts)) + " |")
    if len(models) < 2:
        return "\n".join(out)
    out += ["", "| model held out | chosen on the others | held out: within 0.5 dB / mean gap |", "|---|---|---|"]
    for model in models:
        others = [m for m in models if m != model]
        pick = max(counts, key=lambda n: score(n, others)[:2])
        held = score(pick, [model])
        out.append(f"| {model} | {pick} | {held[0]} of {held[2]} / {-held[1]:.2f} |")
    return "\n".join(out)


def draws_report(folder: str, sizes=(2, 4, 8), draws: int = 2000, seed: int = 0) -> str:
    """How well any choice made on n prompts can do: from the --labels-only files in ``folder`` (every
    label's plan measured on the same held-out prompts), draw n of the prompts many times, pick the label
    with the best mean latent PSNR on them (DPCache Schedule's rule, ``RULES[0]``) and score it on other prompts (all but the largest n, for every n) against the best label
    there. Also the pack's own choice (by its check runs) on all prompts, with the paired standard
    error of its gap."""
    import random
    rng = random.Random(seed)
    cells = per_prompt_cells(folder)
    if not cells:
        return "no --labels-only files with per-prompt PSNRs in " + folder
    head = cells[0][0]
    out = [f"Made by `<ComfyUI's python> -m bench.replay_choice --labels-only --model <m> --steps <s> --ks <K...> "
           f"--prompts {head['prompts']} --calib {head['calib']} --check-runs {head['check_runs']} --labels-json <f>` at "
           f"{', '.join(sorted({d['commit'] for d, _, _ in cells}))}, then `--draws <folder>` ({draws} draws, seed {seed}). "
           "Decoded PSNR, dB; the choice on the drawn prompts uses the latent PSNR, as the check runs do, "
           f"and is scored on {head['prompts'] - max(sizes)} "
           "other prompts against the best label on those.", "",
           "| model | steps | K | pack's choice (check runs) | gap on all prompts | paired SE of the gap | best label | "
           + " | ".join(f"choice on {n} prompts: within 0.5 dB / mean gap" for n in sizes) + " |",
           "|---|---|---|---|---|---|---|" + "---|" * len(sizes)]
    totals = {n: [] for n in sizes}
    pack = []
    for d, k, c in cells:
        labels = c["labels"]
        names = list(labels)
        count = len(c["chosen_psnrs"])
        picked, best, gap, se = pack_gap(c)
        pack.append((gap, se))
        row = [d["model"], str(d["steps"]), str(k), picked, f"{gap:.2f}", f"{se:.2f}", best]
        for n in sizes:
            gaps = []
            for _ in range(draws):
                order = rng.sample(range(count), count)
                pick, rest = order[:n], order[max(sizes):]  # the same number of scoring prompts for every n
                fake = {m: dict(check=[labels[m]["latents"][i] for i in pick]) for m in names}
                m = rule_pick(fake, RULES[0])
                score = lambda x: statistics.fmean(labels[x]["psnrs"][i] for i in rest)
                gaps.append(max(score(x) for x in names) - score(m))
            totals[n].append(gaps)
            row.append(f"{sum(g <= 0.5 for g in gaps) / draws:.0%} / {statistics.fmean(gaps):.2f}")
        out.append("| " + " | ".join(row) + " |")
    out += ["", f"{len(cells)} cells. The pack's choice within 0.5 dB of the best label on all prompts in "
            f"{sum(g <= 0.5 for g, _ in pack)}; its gap more than two standard errors above 0.5 dB in "
            f"{sum(g - 2 * se > 0.5 for g, se in pack)}."]
    for n in sizes:
        every = [g for gaps in totals[n] for g in gaps]
        sure = sum(statistics.fmean([g <= 0.5 for g in gaps]) >= 0.9 for gaps in totals[n])
        out.append(f"Choice on {n} prompts (held-out prompts standing in for check runs): within 0.5 dB in "
                   f"{statistics.fmean([g <= 0.5 for g in every]):.0%} of draws, mean gap {statistics.fmean(every):.2f} dB; "
                   f"cells within 0.5 dB in at least 90% of draws: {sure} of {len(cells)}.")
    return "\n".join(out)
