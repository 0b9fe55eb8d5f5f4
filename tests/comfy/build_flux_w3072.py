"""Build the full-width test FLUX (hidden 3072 like FLUX.1-dev, 1 double + 2 single blocks, random
weights, ~688M parameters) with ComfyUI's own classes and save it, 1.3 GB in bf16, as
<ComfyUI>/models/diffusion_models/tiny_flux_w3072.safetensors (the real checkpoint key layout).

    COMFYUI_PATH=<ComfyUI checkout> <ComfyUI's python> tests/comfy/build_flux_w3072.py [OUT]

Used by tests/comfy/test_host_calibrate_memory.py (calibration memory at a real cache-point width).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_host  # noqa: E402

FILE = "tiny_flux_w3072.safetensors"
CONFIG = dict(image_model="flux", in_channels=16, out_channels=16, patch_size=2, vec_in_dim=768,
              context_in_dim=4096, hidden_size=3072, num_heads=24, mlp_ratio=4.0, depth=1,
              depth_single_blocks=2, axes_dim=[16, 56, 56], theta=10000, qkv_bias=True, guidance_embed=True)


def default_path() -> str:
    return os.path.join(comfy_host.COMFY, "models", "diffusion_models", FILE)


def main() -> None:
    import pytest

    try:
        comfy_host.boot()
    except pytest.skip.Exception as exc:
        sys.exit(f"cannot build: {exc}")
    import torch
    import comfy.supported_models as sm
    from safetensors.torch import save_file

    out = sys.argv[1] if len(sys.argv) > 1 else default_path()
    config = sm.Flux(comfy_host.with_host_fields(dict(CONFIG)))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    comfy_host.init_weights(model.diffusion_model, seed=4567)
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.diffusion_model.state_dict().items()}
    tmp = out + ".part"
    save_file(state, tmp)
    os.replace(tmp, out)
    print(f"{out}: {sum(v.numel() for v in state.values()) / 1e6:.0f}M parameters")


if __name__ == "__main__":
    main()
