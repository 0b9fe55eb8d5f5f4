"""ComfyUI face of the pack: node classes (dpcache_nodes) and the sampling hooks (hooks)."""
from .dpcache_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
