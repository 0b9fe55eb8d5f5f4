"""ComfyUI-DPCache: DPCache (CVPR 2026) caching in ComfyUI for FLUX.1, FLUX.2, Chroma, HunyuanVideo (1.5),
Qwen-Image, Z-Image, Lumina 2, Krea2, LTX-2, Kandinsky 5, Wan2.1 and Wan2.2 (the supported families and
their ComfyUI classes: README, "Supported models")."""
if __package__:  # loaded by ComfyUI as a package (named after its folder, e.g. ComfyUI-DPCache)
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # imported as a plain module, e.g. by pytest from a folder whose name is no package name
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
