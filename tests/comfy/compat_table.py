"""Turn the `[compose] ...` lines that tests/comfy/test_host_compose.py prints (with -s) into the
markdown table of docs/compatibility.md.

    COMFYUI_PATH=<ComfyUI> <host python> -m pytest -q -s tests/comfy/test_host_compose.py | tee compose.log
    python tests/comfy/compat_table.py compose.log
"""
from __future__ import annotations

import sys

HEADER = ("| node | family | order | K = T | K < T block calls | notes (the run's DPCache report) |\n"
          "| --- | --- | --- | --- | --- | --- |")


def table(lines) -> str:
    rows = [HEADER]
    for line in lines:
        if not line.startswith("[compose] "):
            continue
        cells = [c.strip().replace("|", "/") for c in line[len("[compose] "):].rstrip("\n").split(" | ")]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") if len(sys.argv) > 1 else sys.stdin as f:
        print(table(f))
