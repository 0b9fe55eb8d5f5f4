"""CPU tier: the PACTs shipped in cost_matrices/ (the DPCache authors' FLUX and Wan tensors).

They load with their provenance, the exact DP plans on them at least as well as the authors' own
schedules, DPCache Schedule lists and plans them and Apply DPCache runs them on the fakes, they
are what the documented command makes from the reference tensors, and the folder's README and
the NOTICE account for every file.
"""
from __future__ import annotations

import glob
import json
import os
import re

import numpy as np
import pytest

import nodes_fakes as F
from dpcache_core import load_pact, mandatory_steps, path_cost, solve_schedule
from dpcache_core.convert import convert, main as convert_main, read_metadata
from nodes import dpcache_nodes as nd

ROOT = F.ROOT
SHIPPED = os.path.join(ROOT, "cost_matrices")
REFERENCE = os.path.join(ROOT, "..", "shared", "reference")
FILES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(SHIPPED, "*.safetensors")))
FAMILY_OF_REFERENCE = {"flux1_dev_official_T50.safetensors": "flux", "wan21_i2v_14b_official_T50.safetensors": "wan"}
REQUIRED = ("model_family", "model", "num_evals", "order", "scheme", "convention", "sampler", "scheduler", "shift",
            "guidance", "resolution", "source_repo", "source_commit", "source_file", "licence", "copyright", "changes")


def shipped(name):
    return load_pact(os.path.join(SHIPPED, name))


def test_the_authors_pacts_ship():
    assert FILES == sorted(FAMILY_OF_REFERENCE)


@pytest.mark.parametrize("name", FILES)
def test_shipped_file_loads_with_its_provenance(name):
    acc, meta = shipped(name)
    missing = [k for k in REQUIRED if k not in meta]
    assert not missing, missing
    assert meta["model_family"] == FAMILY_OF_REFERENCE[name]
    assert (meta["num_evals"], meta["order"], meta["scheme"], meta["convention"]) == (50, 2, "reference", "reference")
    assert meta["steps"] == 50 and meta["sampler"] == "euler"
    assert meta["licence"] == "Apache-2.0" and meta["source_repo"] == "https://github.com/argsss/DPCache"
    assert re.fullmatch(r"[0-9a-f]{40}", meta["source_commit"]) and "Pipei Huang" in meta["copyright"]
    assert len(meta["eval_sigmas"]) == 51 and meta["eval_sigmas"][0] == 1.0 and meta["eval_sigmas"][-1] == 0.0
    assert all(a > b for a, b in zip(meta["eval_sigmas"], meta["eval_sigmas"][1:]))
    positions = meta["positions"]
    assert len(positions) == 51 and positions[0] == 0.0 and positions[-1] == 1.0
    assert all(a < b for a, b in zip(positions, positions[1:]))
    # one sample: every finite entry of the authors' tensor counts once, +inf entries not at all
    assert acc.samples == 1 and meta["samples"] == 1
    assert set(np.unique(acc.counts)) == {0, 1}
    cost = acc.mean()
    assert np.array_equal(np.isfinite(cost), acc.counts == 1)
    assert (acc.sums[acc.counts == 0] == 0).all() and (cost[np.isfinite(cost)] >= 0).all()


def official_cases():
    path = os.path.join(REFERENCE, "official_schedules.json")
    if not os.path.isfile(path):
        pytest.skip("the reference implementation's schedules (official_schedules.json) are not shipped in this repository and were not found")
    with open(path) as f:
        schedules = json.load(f)["schedules"]
    for key, keys in schedules.items():
        family, t, k, first, last = key.split("/")
        yield family, int(t[1:]), int(k[1:]), int(first[len("first"):]), int(last[len("last"):]), keys


@pytest.mark.parametrize("name", FILES)
def test_exact_dp_on_the_shipped_file_is_never_costlier_than_the_official_schedules(name):
    acc, meta = shipped(name)
    cost = acc.mean()
    cases = [c for c in official_cases() if c[0] == meta["model_family"]]
    assert len(cases) >= 10, "official_schedules.json should list K = 8..14 for this family"
    cheaper = 0
    for _, t, num_keys, first, last, official in cases:
        assert t == acc.num_evals
        keys = solve_schedule(cost, num_keys, first, last)
        assert len(keys) == num_keys and set(mandatory_steps(t, first, last)) <= set(keys)
        ours, theirs = path_cost(cost, keys), path_cost(cost, official)
        assert np.isfinite(theirs) and ours <= theirs * (1 + 1e-12), (num_keys, first, last, keys, official)
        cheaper += ours < theirs * (1 - 1e-9)
    print(f"\n{name}: exact DP no costlier on {len(cases)} official schedules, strictly cheaper on {cheaper}")


@pytest.mark.parametrize("name", FILES)
def test_shipped_file_is_the_documented_conversion(name, tmp_path):
    """Converting the reference tensor with the committed provenance gives the shipped file again."""
    src = os.path.join(REFERENCE, f"pact_official_{FAMILY_OF_REFERENCE[name]}.npy")
    if not os.path.isfile(src):
        pytest.skip("the reference implementation's cost tensors (pact_official_*.npy) are not shipped in this repository and were not found")
    stem = os.path.splitext(name)[0]
    out = tmp_path / name
    convert_main([src, str(out), "--metadata", os.path.join(SHIPPED, "provenance", stem + ".json")])
    (acc, meta), (again, meta2) = shipped(name), load_pact(str(out))
    assert np.array_equal(acc.sums, again.sums) and np.array_equal(acc.counts, again.counts)
    meta.pop("pack_version"), meta2.pop("pack_version")
    assert meta == meta2
    ref = np.load(src, allow_pickle=False)
    assert np.array_equal(acc.mean(), ref)  # values unchanged, +inf where the reference has +inf


def test_readme_has_a_row_per_shipped_file_and_the_notice_names_them():
    readme = open(os.path.join(SHIPPED, "README.md"), encoding="utf-8").read()
    rows = [line for line in readme.splitlines() if line.startswith("| `")]
    for name in FILES:
        assert sum(f"`{name}`" in r for r in rows) == 1, f"no provenance row for {name}"
        assert os.path.isfile(os.path.join(SHIPPED, "provenance", os.path.splitext(name)[0] + ".json"))
        assert f"--metadata cost_matrices/provenance/{os.path.splitext(name)[0]}.json" in readme
    notice = open(os.path.join(ROOT, "NOTICE"), encoding="utf-8").read()
    for name in FILES:
        _, meta = shipped(name)
        assert f"cost_matrices/{name}" in notice and meta["source_file"] in notice
        assert meta["source_commit"] in notice and meta["source_repo"] in notice
    assert "Apache License, Version 2.0" in notice and "Changes made" in notice
    licence = open(os.path.join(SHIPPED, "LICENSE-Apache-2.0.txt"), encoding="utf-8").read()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence and "END OF TERMS AND CONDITIONS" in licence
    main_readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert "NOTICE" in main_readme.split("## Licence")[1]


@pytest.mark.parametrize("name", FILES)
def test_schedule_node_lists_and_plans_the_shipped_file(name):
    assert name in nd.DPCacheSchedule.INPUT_TYPES()["required"]["pact"][0]
    out = nd.DPCacheSchedule().schedule(pact=name, key_steps=13, first_full_steps=3, last_full_steps=0,
                                        total_evaluations=50, manual_key_steps="")
    sched, image = out["result"]
    _, meta = shipped(name)
    assert sched.num_evals == 50 and sched.num_keys == 13 and sched.key_steps[:3] == (0, 1, 2)
    assert sched.model_family == meta["model_family"] and sched.order == 2 and sched.scheme == "reference"
    assert sched.source == f"pact:{name}" and np.isfinite(sched.cost)
    assert "13 of 50 evaluations" in out["ui"]["text"][0]
    assert image.shape[0] == 1 and image.shape[-1] == 3


def test_apply_runs_the_shipped_schedules_on_their_family_only():
    fams = {FAMILY_OF_REFERENCE[n]: n for n in FILES}
    for family, make, other in (("flux", F.Flux, F.WanModel), ("wan", F.WanModel, F.Flux)):
        out = nd.DPCacheSchedule().schedule(pact=fams[family], key_steps=13, first_full_steps=3, last_full_steps=0,
                                            total_evaluations=50, manual_key_steps="")
        sched = out["result"][0]
        model = F.FakePatcher(make())
        patched = nd.DPCacheApply().apply(model, sched)["result"][0]
        F.sample(patched, steps=50, cfg=1.0)
        calls = {b.calls for b in model.dm.modules() if isinstance(b, F.Block)}
        per_block = 2 if family == "flux" else 1
        assert calls <= {13, 13 * per_block}, calls  # blocks ran at the 13 key evaluations only
        with pytest.raises(ValueError, match=f"planned on a {family} PACT"):
            nd.DPCacheApply().apply(F.FakePatcher(other()), sched)


def test_convert_reads_npy_without_pickle_and_refuses_the_rest(tmp_path):
    cost = np.full((4, 5, 5), np.inf)
    cost[1, 2, 3:] = [1.0, 2.0]
    src = tmp_path / "pact.npy"
    np.save(src, cost)
    meta_file = tmp_path / "meta.json"
    meta_file.write_text(json.dumps({"model_family": "wan", "licence": "Apache-2.0", "order": 3}))
    out = tmp_path / "out.safetensors"
    convert_main([str(src), str(out), "--metadata", str(meta_file), "--order", "2"])
    acc, meta = load_pact(str(out))
    assert np.array_equal(acc.mean(), cost) and meta["licence"] == "Apache-2.0" and meta["order"] == 2
    assert meta["model_family"] == "wan" and meta["imported_from"] == "pact.npy" and meta["scheme"] == "reference"

    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{"not": "numbers"}], dtype=object), allow_pickle=True)
    bad_shape = tmp_path / "shape.npy"
    np.save(bad_shape, np.zeros((4, 4, 4)))
    text = tmp_path / "pact.txt"
    text.write_text("1 2 3")
    for path, message in ((objects, "not a plain numeric .npy"), (bad_shape, r"\(T, T\+1, T\+1\) cost tensor"),
                          (text, "expected a .pkl or .npy")):
        with pytest.raises(Exception, match=message):
            convert(str(path), str(tmp_path / "x.safetensors"), "flux")
    with pytest.raises(Exception, match="--family"):
        convert(str(src), str(tmp_path / "x.safetensors"))
    assert not (tmp_path / "x.safetensors").exists()
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(Exception, match="JSON object"):
        read_metadata(str(tmp_path / "list.json"))


def test_convert_command_line_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        convert_main([str(tmp_path / "missing.npy"), str(tmp_path / "out.safetensors"), "--family", "flux"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read") and "Traceback" not in err
