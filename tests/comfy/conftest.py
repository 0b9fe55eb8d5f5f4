"""Real-host tier fixtures (helpers in comfy_host.py). Every test here skips, with the reason,
when COMFYUI_PATH is unset or ComfyUI cannot be imported."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from comfy_host import _state, boot  # noqa: E402


@pytest.fixture(scope="session")
def host():
    yield boot()
    # drop the models before interpreter shutdown (ModelPatcher.__del__ then needs its modules)
    import gc
    import comfy.model_management
    _state.pop("models", None)
    comfy.model_management.unload_all_models()
    gc.collect()


@pytest.fixture
def pact_dir(host, tmp_path):
    """models/dpcache redirected to a temporary folder for the test."""
    import folder_paths
    folder_paths.add_model_folder_path("dpcache", str(tmp_path), is_default=True)
    yield tmp_path
    paths = folder_paths.folder_names_and_paths["dpcache"][0]
    if str(tmp_path) in paths:
        paths.remove(str(tmp_path))


