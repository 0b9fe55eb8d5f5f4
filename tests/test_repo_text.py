"""A contributor has only the repository: the README, the docs and the tests' skip reasons name nothing
outside it (no ../shared, no development-workspace kits)."""
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTSIDE = re.compile(r"\.\./shared|comfyui-host|development workspace")


def repo_texts():
    patterns = ["README.md", "BENCHMARKS.md", "docs/*.md", "cost_matrices/*.md", "web/docs/*.md", "tests/**/*.py", "tests/**/*.mjs",
                "scripts/*.sh"]
    for pattern in patterns:
        for path in glob.glob(os.path.join(ROOT, pattern), recursive=True):
            if os.path.basename(path) != "test_repo_text.py":
                yield path


def test_nothing_points_outside_the_repository():
    found = []
    for path in repo_texts():
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if OUTSIDE.search(line):
                    found.append(f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()[:100]}")
    assert not found, "\n".join(found)


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def test_the_docs_describe_the_real_comfyui_tier_for_a_contributor():
    assert "point COMFYUI_PATH at a ComfyUI checkout and COMFYUI_PYTHON at its Python" in read("docs/development.md")
    samplers = read("docs/errors-and-samplers.md")
    assert "uni_pc" in samplers and "dpm_adaptive" in samplers  # which samplers are checked before sampling
    readme = read("README.md")
    assert "docs/development.md" in readme and "docs/errors-and-samplers.md" in readme


COMMAND = re.compile(r"-m bench\.|bash scripts/|-m pytest")
COMMIT = re.compile(r"\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b")
FIGURE = re.compile(r"\d\s?(dB|x|%|ms|s|MiB|GiB|GB|MB)\b")
LOOKBACK = 30  # lines above a table, not crossing a heading, where its command and commit must be named


def tables(lines):
    """(first line number, rows) of each markdown table."""
    found, start = [], None
    for n, line in enumerate(lines + [""]):
        if line.startswith("|") and start is None:
            start = n
        elif not line.startswith("|") and start is not None:
            found.append((start, lines[start:n]))
            start = None
    return found


def names_command(line):
    return bool(COMMAND.search(line) and COMMIT.search(line))


def unnamed_tables(path, figures_only):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        lines = f.read().splitlines()
    bad = []
    for start, rows in tables(lines):
        if figures_only and not any(FIGURE.search(r) for r in rows[2:]):
            continue
        if all(names_command(r) for r in rows[2:]):  # a summary table names them in every row
            continue
        above = []
        for line in reversed(lines[max(0, start - LOOKBACK):start]):
            if line.startswith("#"):
                break
            above.append(line)
        if not any(names_command(line) for line in above):
            bad.append(f"{path}:{start + 1}: {rows[0][:80]}")
    return bad


def test_every_figure_table_names_its_command_and_commit():
    """Issue 20: each table of measured figures says, just above it (or in every row), the command
    that made it (python -m bench..., bash scripts/..., -m pytest ...) and the commit."""
    bad = unnamed_tables("BENCHMARKS.md", figures_only=False) + unnamed_tables("README.md", figures_only=True)
    assert not bad, "tables without a command and commit above them:\n" + "\n".join(bad)


def test_the_table_check_catches_a_table_without_its_command(tmp_path, monkeypatch):
    (tmp_path / "X.md").write_text("## A\n\nMade by `python -m bench.quality` at d0c5f39.\n\n| a | b |\n|---|---|\n| 1 | 2 dB |\n\n"
                                   "## B\n\n| a | b |\n|---|---|\n| 1 | 2 dB |\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    assert unnamed_tables("X.md", figures_only=True) == ["X.md:11: | a | b |"]


def test_readme_is_short():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= 260


def test_readme_links_resolve():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    targets = set(re.findall(r"\]\(((?!https?:)[^)#]+)", text))
    assert "docs/planning.md" in targets
    missing = [t for t in sorted(targets) if not os.path.exists(os.path.join(ROOT, t))]
    assert not missing, missing


FAMILIES = ("FLUX.1", "FLUX.2", "Chroma", "HunyuanVideo (1.5)", "Qwen-Image", "Z-Image", "Lumina 2", "Krea2", "LTX-2",
            "Kandinsky 5", "Wan2.1", "Wan2.2")


def test_metadata_and_model_inputs_name_every_family():
    import json

    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        description = re.search(r'^description = "(.*)"$', f.read(), re.M).group(1)
    with open(os.path.join(ROOT, "node_list.json"), encoding="utf-8") as f:
        node_list = json.load(f)
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        intro = f.read().split("\n\n")[1].replace("\n", " ")
    docs = []
    for page in ("DPCacheCalibrate", "DPCacheApply"):
        with open(os.path.join(ROOT, "web", "docs", page + ".md"), encoding="utf-8") as f:
            docs.append(" ".join(f.read().split()))
    with open(os.path.join(ROOT, "nodes", "dpcache_nodes.py"), encoding="utf-8") as f:
        source = f.read()
    shared = "".join(re.findall(r'"([^"]*)"', re.search(r"^MODEL_TOOLTIP = \((.*?)\)$", source, re.S | re.M).group(1)))
    tooltips = [shared] * source.count('"model": ("MODEL", {"tooltip": MODEL_TOOLTIP})')  # Calibrate's and Apply's
    assert len(tooltips) == 2
    for text in (description, node_list["DPCacheCalibrate"], node_list["DPCacheApply"], intro, *docs, *tooltips):
        assert all(name in text for name in FAMILIES), text


ISSUE = re.compile(r"\bissues?\s*#?\s*\d+|(?<![\w/&])#\d{2,}\b", re.I)


def issue_mentions(paths):
    found = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if ISSUE.search(line):
                    found.append(f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()[:100]}")
    return found


def test_readme_docs_and_benchmarks_name_no_issue():
    """A reader has no issue tracker: README, docs and BENCHMARKS say what changed, not which issue asked."""
    paths = [os.path.join(ROOT, p) for p in ("README.md", "BENCHMARKS.md", "CHANGELOG.md")]
    paths += glob.glob(os.path.join(ROOT, "docs", "*.md")) + glob.glob(os.path.join(ROOT, "web", "docs", "*.md"))
    found = issue_mentions([p for p in paths if os.path.exists(p)])
    assert not found, "\n".join(found)


def test_the_issue_check_catches_an_issue_number(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Before issue 19 it peaked.\nSee #18.\nFixed upstream (https://github.com/a/b/issues/45).\n")
    assert [line.split(": ", 1)[1] for line in issue_mentions([str(page)])] == ["Before issue 19 it peaked.", "See #18."]


BENCHMARKS_MAX_BYTES = 30 * 1024


def test_benchmarks_is_a_current_document_of_at_most_30_kb():
    """Superseded runs live in bench/results/history_*.md; BENCHMARKS.md keeps the summary and current tables."""
    size = os.path.getsize(os.path.join(ROOT, "BENCHMARKS.md"))
    assert size <= BENCHMARKS_MAX_BYTES, f"BENCHMARKS.md is {size} bytes; move superseded runs to bench/results/history_*.md"
    assert glob.glob(os.path.join(ROOT, "bench", "results", "history_*.md"))


def tables_without_a_line_above(path):
    """Tables whose nearest non-blank line above does not name a command and a commit (a summary table
    that names them in every row is fine)."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        lines = f.read().splitlines()
    bad = []
    for start, rows in tables(lines):
        if all(names_command(r) for r in rows[2:]):
            continue
        above = next((line for line in reversed(lines[:start]) if line.strip()), "")
        if not names_command(above):
            bad.append(f"{path}:{start + 1}: {rows[0][:80]}")
    return bad


def test_each_benchmarks_table_has_its_command_and_commit_on_the_line_above():
    bad = tables_without_a_line_above("BENCHMARKS.md")
    assert not bad, "tables without a 'Made by `...` at commit ...' line just above:\n" + "\n".join(bad)


def test_the_line_above_check_catches_a_table_a_paragraph_away(tmp_path, monkeypatch):
    (tmp_path / "B.md").write_text("Made by `python -m bench.speed` at d0c5f39.\n\n| a |\n|---|\n| 1 |\n\n"
                                   "Made by `python -m bench.memory` at bf87b6e.\n\nWhat it measures.\n\n| a |\n|---|\n| 2 |\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    assert tables_without_a_line_above("B.md") == ["B.md:11: | a |"]


def test_the_wan22_workflow_is_described_as_it_is():
    """workflows/wan22_i2v_dpcache.json runs an Apply DPCache in the automatic mode on each expert, not one schedule."""
    import json

    with open(os.path.join(ROOT, "workflows", "wan22_i2v_dpcache.json"), encoding="utf-8") as f:
        nodes = json.load(f)["nodes"]
    applies = [n for n in nodes if n["type"] == "DPCacheApply"]
    automatic = [n for n in applies if not next(i.get("link") for i in n["inputs"] if i["name"] == "schedule")]
    assert len(applies) == len(automatic) == 2
    page = read("docs/workflows.md")
    assert "two experts, one schedule" not in page
    assert "one Apply DPCache in the automatic mode on each expert" in page


def test_the_package_docstring_and_classifiers_describe_the_pack():
    import ast

    docstring = ast.get_docstring(ast.parse(read("__init__.py")))
    assert all(name in docstring for name in FAMILIES), docstring
    pyproject = read("pyproject.toml")
    classifiers = re.search(r"^classifiers = \[(.*?)\]", pyproject, re.M | re.S).group(1)
    gpus = re.findall(r'"Environment :: GPU :: ([^"]+)"', classifiers)
    assert len(gpus) > 1 and "NVIDIA CUDA" in gpus  # plain PyTorch: not CUDA only
    assert 'requires-comfyui = ">=0.3.64"' in pyproject


def test_readme_states_the_spectral_peak_the_code_declares():
    import torch

    from dpcache_core import spectral

    elements = 4096 * 3072  # FLUX.1-dev at 1024x1024
    per_element = spectral.peak_bytes(elements, torch.bfloat16) / elements
    readme = " ".join(read("README.md").split())
    assert f"{per_element:.2f} bytes (bf16) with the spectral forecaster" in readme
    assert f"{spectral.peak_bytes(elements, torch.bfloat16) / 1e9:.2f} GB there" in readme


def test_readme_tells_a_newcomer_the_real_tier_and_the_automatic_files():
    readme = " ".join(read("README.md").split())
    assert "COMFYUI_PATH=<a ComfyUI checkout> COMFYUI_PYTHON=<its Python> bash scripts/test.sh" in readme
    assert "tested on ComfyUI 0.3.64 and 0.33.0" in readme
    assert "models/dpcache/auto_*.safetensors" in readme and "Delete the ones you no longer need" in readme
