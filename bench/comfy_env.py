"""Boot a real ComfyUI (found through COMFYUI_PATH) inside this process, for the bench commands.

Nothing from ComfyUI is copied here: it is imported at run time, like `main.py --cpu` (or without
`--cpu` on a GPU machine). The DPCache pack itself is loaded with ComfyUI's own custom-node loader.
"""
from __future__ import annotations

import asyncio
import os
import sys

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_state: dict = {}


class ComfyNotFound(RuntimeError):
    pass


def comfy_path() -> str:
    path = os.environ.get("COMFYUI_PATH", "")
    if not path:
        raise ComfyNotFound("set COMFYUI_PATH to a ComfyUI checkout (and run with the python ComfyUI is installed in)")
    if not os.path.isfile(os.path.join(path, "main.py")):
        raise ComfyNotFound(f"COMFYUI_PATH={path} has no main.py: point it at a ComfyUI checkout")
    return path


def import_comfy(cpu: bool = True) -> str:
    """Import ComfyUI's modules (argument parsing as `main.py [--cpu]`); returns its path."""
    path = comfy_path()
    if "path" in _state or "comfy.cli_args" in sys.modules:  # already imported (e.g. by the real-host tests)
        _state["path"] = path
        return path
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.options
    comfy.options.enable_args_parsing()
    saved = sys.argv
    sys.argv = [os.path.join(path, "main.py")] + (["--cpu"] if cpu else [])
    try:
        from comfy.cli_args import args  # noqa: F401  parsed before model_management loads
    finally:
        sys.argv = saved
    import folder_paths  # noqa: F401
    import utils.extra_config  # noqa: F401  (before nodes: nodes puts comfy/ first on sys.path)
    import comfy.model_management  # noqa: F401
    import comfy.utils
    comfy.utils.set_progress_bar_enabled(False)
    _state["path"] = path
    return path


def boot(cpu: bool = True, extra_nodes: tuple[str, ...] = ()) -> dict:
    """Import ComfyUI, load comfy_extras (EasyCache, LazyCache), `extra_nodes` and this pack.

    Returns {"nodes": NODE_CLASS_MAPPINGS, "core": the pack's dpcache_core}.
    """
    if "nodes" in _state:
        return _state
    import_comfy(cpu)
    import nodes
    import server
    if getattr(server.PromptServer, "instance", None) is None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        server.PromptServer(loop)
    loop = server.PromptServer.instance.loop
    if "EasyCache" not in nodes.NODE_CLASS_MAPPINGS:
        loop.run_until_complete(nodes.load_custom_node(
            os.path.join(_state["path"], "comfy_extras", "nodes_easycache.py"), module_parent="comfy_extras"))
    for extra in extra_nodes:
        if not loop.run_until_complete(nodes.load_custom_node(extra)):
            raise RuntimeError(f"ComfyUI could not load the custom node {extra}")
    mod = PACK_DIR.replace(".", "_x_")
    if mod not in sys.modules and not loop.run_until_complete(nodes.load_custom_node(PACK_DIR)):
        raise RuntimeError("ComfyUI could not load the DPCache pack")
    _state.update(loop=loop, nodes=nodes.NODE_CLASS_MAPPINGS, core=sys.modules[mod + ".dpcache_core"])
    return _state


PARAMS = {"flux": ("comfy.ldm.flux.model", "FluxParams"), "flux2": ("comfy.ldm.flux.model", "FluxParams"),
          "chroma": ("comfy.ldm.chroma.model", "ChromaParams"),
          "hunyuan_video": ("comfy.ldm.hunyuan_video.model", "HunyuanVideoParams")}


def with_host_fields(cfg):
    """``cfg`` plus the required fields this host's params class has and ``cfg`` lacks, read from the class
    (ComfyUI 0.33 added e.g. FLUX.1 ``txt_ids_dims``, HunyuanVideo's 1.5 fields): a list gets [], a bool
    False, anything else None, what the host's detection gives a model without them."""
    import dataclasses
    import importlib
    where = PARAMS.get(cfg.get("image_model"))
    if where is None:
        return dict(cfg)
    params = getattr(importlib.import_module(where[0]), where[1])
    out = dict(cfg)
    for f in dataclasses.fields(params):
        if f.name not in out and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
            out[f.name] = [] if kind == "list" else False if kind == "bool" else None
    return out
