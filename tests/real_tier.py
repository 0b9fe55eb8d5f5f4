"""Why a real-ComfyUI test skips when COMFYUI_PATH is unset: one text for every tier's skip reason."""
import os


def unset_reason() -> str:
    """scripts/test.sh runs the CPU tier without COMFYUI_PATH and sets DPCACHE_REAL_TIER_SEPARATE=1 when
    it will run the real tier afterwards; otherwise the reader is told what to set."""
    if os.environ.get("DPCACHE_REAL_TIER_SEPARATE"):
        return "real-ComfyUI test: the real-ComfyUI tier runs separately below with COMFYUI_PYTHON"
    return "real-ComfyUI test: set COMFYUI_PATH (a ComfyUI checkout) and COMFYUI_PYTHON (its Python) to run it"
