"""A contributor has only the repository: the README, the docs and the tests' skip reasons name nothing
outside it (no ../shared, no development-workspace kits)."""
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTSIDE = re.compile(r"\.\./shared|comfyui-host|development workspace")


def repo_texts():
    patterns = ["README.md", "BENCHMARKS.md", "cost_matrices/*.md", "web/docs/*.md", "tests/**/*.py", "tests/**/*.mjs",
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


def test_readme_describes_the_real_comfyui_tier_for_a_contributor():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert "point COMFYUI_PATH at a ComfyUI checkout and COMFYUI_PYTHON at its Python" in text
    assert "uni_pc" in text and "dpm_adaptive" in text  # which samplers are checked before sampling
