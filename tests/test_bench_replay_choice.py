"""bench.choice_reports (bench.replay_choice --draws, --check-runs-of), on made-up per-prompt files."""
import json

from bench import choice_reports as rc


def write_cell(folder, name, labels, chosen):
    cell = {"checked_k": 13, "labels": {n: {"check": [0.0], "psnrs": p, "latents": p, "mean": sum(p) / len(p)}
                                        for n, p in labels.items()},
            "chosen_psnrs": labels[chosen], "chosen_latents": labels[chosen]}
    data = {"model": name, "steps": 50, "calib": 4, "check_runs": 4, "prompts": 6, "commit": "abc", "cells": {"13": cell}}
    (folder / f"labels_{name}_50.json").write_text(json.dumps(data))


def test_a_label_better_on_every_prompt_is_always_chosen(tmp_path):
    write_cell(tmp_path, "flux", {"taylor 1": [30, 31, 32, 33, 34, 35], "spectral": [33, 34, 35, 36, 37, 38]}, "taylor 1")
    text = rc.draws_report(str(tmp_path), sizes=(2,), draws=50)
    assert "| flux | 50 | 13 | taylor 1 | 3.00 | 0.00 | spectral | 100% / 0.00 |" in text
    assert "best label on all prompts in 0; its gap more than two standard errors above 0.5 dB in 1." in text


def test_noisy_labels_are_chosen_well_only_sometimes(tmp_path):
    write_cell(tmp_path, "qwen", {"taylor 1": [30, 40, 30, 40, 30, 40], "spectral": [40, 30, 40, 30, 40, 31]}, "spectral")
    text = rc.draws_report(str(tmp_path), sizes=(2,), draws=400)
    row = next(line for line in text.splitlines() if line.startswith("| qwen"))
    share = int(row.split("|")[8].split("%")[0])
    assert 20 < share < 90  # right only when the two drawn prompts happen to favour the better label
    assert "gap more than two standard errors above 0.5 dB in 0." in text


def test_files_without_per_prompt_values_are_said(tmp_path):
    (tmp_path / "labels_flux_50.json").write_text(json.dumps({"model": "flux", "steps": 50, "cells": {
        "13": {"labels": {"spectral": {"check": [1.0], "mean": 1.0}}}}}))
    assert rc.draws_report(str(tmp_path)).startswith("no --labels-only files")


def test_the_number_of_check_runs_is_chosen_on_the_other_models(tmp_path):
    better, worse = {"taylor 1": [30, 31, 32, 33], "spectral": [33, 34, 35, 36]}, "taylor 1"
    for runs in (4, 8):
        folder = tmp_path / str(runs)
        folder.mkdir()
        for model in ("flux", "wan"):
            write_cell(folder, model, better, worse if runs == 4 else "spectral")
            data = json.loads((folder / f"labels_{model}_50.json").read_text())
            (folder / f"labels_{model}_50.json").write_text(json.dumps({**data, "check_runs": runs}))
    text = rc.check_runs_report([str(tmp_path / "4"), str(tmp_path / "8")])
    assert "| all | 0 of 2 / 3.00 / 2 | 2 of 2 / 0.00 / 0 |" in text
    assert "| flux | 8 check runs | 1 of 1 / 0.00 |" in text and "| wan | 8 check runs | 1 of 1 / 0.00 |" in text
    assert "| model | 4 check runs: within 0.5 dB" in text


def test_a_folder_of_another_version_of_the_checks_shows_by_its_name(tmp_path):
    labels = {"taylor 1": [30, 31, 32, 33], "spectral": [33, 34, 35, 36]}
    for name, chosen in (("8", "spectral"), ("8-before", "taylor 1")):
        folder = tmp_path / name
        folder.mkdir()
        write_cell(folder, "flux", labels, chosen)
        data = json.loads((folder / "labels_flux_50.json").read_text())
        (folder / "labels_flux_50.json").write_text(json.dumps({**data, "check_runs": 8}))
    text = rc.check_runs_report([str(tmp_path / "8-before"), str(tmp_path / "8")])
    assert "| model | 8-before: within 0.5 dB / mean gap / clear misses | 8 check runs: within 0.5 dB" in text
    assert "| flux | 0 of 1 / 3.00 / 1 | 1 of 1 / 0.00 / 0 |" in text


def test_the_rules_break_a_level_pair_by_the_next_check_when_the_file_kept_it():
    labels = {"spectral": {"check": [40.5]}, "spectral (history-exact plan)": {"check": [40.56]},
              "taylor 1": {"check": [36.0]}}
    assert rc.rule_pick(labels, rc.RULES[0]) == "spectral (history-exact plan)"  # no next check kept
    labels["spectral"]["next_check"] = [42.3]
    labels["spectral (history-exact plan)"]["next_check"] = [41.4]
    assert rc.rule_pick(labels, rc.RULES[0]) == "spectral"
