"""What the pack shows in the browser: text on a node, the frontend's run event, the progress bar.

Every call is guarded: without a ComfyUI server (headless use, the CPU tests) nothing is shown.
"""
from __future__ import annotations

import textwrap


NODE_TEXT_WIDTH = 30  # characters per line that fit a node of default width in ComfyUI's text widget


def wrap_for_node(text: str, width: int = NODE_TEXT_WIDTH) -> str:
    """``text`` broken into lines at spaces: ComfyUI's node text widget breaks lines anywhere
    (CSS break-all), even inside a number, unless each line fits."""
    return "\n".join(textwrap.fill(part, width, break_long_words=False, break_on_hyphens=False)
                     for part in text.split("\n"))


def send_text(text: str, node_id) -> None:
    """Text on the node in the browser, in lines that fit (guarded: no server in headless use)."""
    if node_id is None:
        return
    try:
        from server import PromptServer

        if PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(wrap_for_node(text), node_id)
    except Exception:  # pragma: no cover - UI feedback is best effort
        pass


def send_event(event: str, data: dict) -> None:
    """A websocket event for the frontend extension (guarded like ``send_text``)."""
    try:
        from server import PromptServer

        if PromptServer.instance is not None:
            PromptServer.instance.send_sync(event, data)
    except Exception:  # pragma: no cover - UI feedback is best effort
        pass


def report_event(node_ids, key_steps, num_evals: int, computed: int, skipped: int, summary: str, source: str,
                 measured: float | None = None) -> None:
    """The plan that ran: ``summary`` on each node that fed the run (Apply DPCache, and the DPCache
    Schedule behind it), and the websocket event the frontend redraws that plan from."""
    nodes = [str(n) for n in node_ids if n is not None]
    for n in nodes:
        send_text(summary, n)
    if nodes:
        keys = list(key_steps)
        send_event("dpcache.run", {
            "node": nodes[0], "nodes": nodes, "computed": computed, "skipped": skipped, "num_evals": num_evals,
            "key_steps": keys, "ideal_speedup": round(num_evals / max(len(keys), 1), 4), "source": source,
            "measured_speedup": None if measured is None else round(measured, 3), "summary": summary})


def progress_bar(total: int, node_id):
    """comfy.utils.ProgressBar when ComfyUI is there; a no-op otherwise. Also honours Cancel."""
    try:
        import comfy.model_management
        import comfy.utils

        bar = comfy.utils.ProgressBar(total, node_id=node_id)

        def update(done, total_now):
            comfy.model_management.throw_exception_if_processing_interrupted()
            bar.update_absolute(done, total_now)

        return update
    except ImportError:
        return None
