"""ComfyUI face of the pack: node classes (dpcache_nodes), the sampling hooks (sampling_hooks, block_patches,
run_state) and what each node does with them (apply_hook, calibrate_hook, auto)."""
from .dpcache_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
