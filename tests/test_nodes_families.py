"""CPU tier: the families table (nodes/families.py) on fakes of each family's block loop."""
from __future__ import annotations

import pytest
import torch

import nodes_fakes as F
from dpcache_core import Schedule
from nodes import block_patches, families
from nodes.dpcache_nodes import DPCacheApply, DPCacheCalibrate

FAKES = {
    "flux": lambda: F.FakePatcher(F.Flux()),
    "chroma": lambda: F.FakePatcher(F.Chroma()),
    "hunyuan_video": lambda: F.FakePatcher(F.HunyuanVideo()),
    "qwen_image": lambda: F.FakePatcher(F.QwenImageTransformer2DModel()),
    "wan": lambda: F.FakePatcher(F.WanModel()),
    "wan22_5b": lambda: F.FakePatcher(F.WanModel(), base="WAN22"),
}


def apply(model, sched):
    return DPCacheApply().apply(model, sched)["result"][0]


@pytest.mark.parametrize("name", FAKES)
def test_recognised_with_blocks_in_execution_order(name):
    model = FAKES[name]()
    info = block_patches.model_info(model)
    assert info.family == name and info.spec is families.family(name)
    dm = model.dm
    if hasattr(dm, "single_blocks"):
        want = [("double_block", i) for i in range(len(dm.double_blocks))] + [("single_block", i) for i in range(len(dm.single_blocks))]
    else:
        want = [("double_block", i) for i in range(len(getattr(dm, "blocks", None) or dm.transformer_blocks))]
    assert info.blocks == want


@pytest.mark.parametrize("name", FAKES)
@pytest.mark.parametrize("cfg,split", [(1.0, False), (2.0, False), (2.0, True)])
def test_prediction_is_the_taylor_step_of_the_image_tokens(name, cfg, split):
    """Every fake returns 0.5 x the image tokens of its last block, so at skipped evaluations the model
    output must be exactly the order-1 extrapolation of the key outputs: this fails if the cache point
    is cut from the wrong tokens (txt first / img first) or the prediction is put back in the wrong place."""
    model = FAKES[name]()
    sched = Schedule((0, 2), 4, order=1, first_full_steps=1)
    out = F.sample(apply(model, sched), steps=4, cfg=cfg, split=split)
    torch.testing.assert_close(out[1], out[0])
    torch.testing.assert_close(out[3], 1.5 * out[2] - 0.5 * out[0])
    ref = F.sample(model, steps=4, cfg=cfg, split=split)
    assert not torch.allclose(ref[3], out[3])  # the skipped evaluation did not run the blocks


@pytest.mark.parametrize("name", FAKES)
def test_cache_point_and_prediction_round_trip(name):
    spec = families.family(name)
    img, txt = torch.randn(2, 6, 4), torch.randn(2, 3, 4)
    joined = {families.TXT_FIRST: torch.cat((txt, img), 1), families.IMG_FIRST: torch.cat((img, txt), 1)}.get(spec.image_tokens, img)
    args = {"img": joined, "txt": txt}
    assert torch.equal(spec.cache_point(joined, 3), img)
    out, image = spec.prediction_output(args, 3)
    image.copy_(img * 2)
    back = spec.passthrough(args, out)
    assert torch.equal(spec.cache_point(back["img"], 3), img * 2)
    assert ("txt" in back) == spec.reads_txt


def test_qwen_double_block_patches_force_full_compute_and_pass_through_otherwise():
    """Qwen-Image calls non-replace patches["double_block"] after every block (DiffSynth ControlNet):
    they add to the features between blocks, so DPCache computes every evaluation; without them it skips."""
    model = FAKES["qwen_image"]()
    seen = []

    def diffsynth_like(a):
        seen.append(a["block_index"])
        return {"img": a["img"] + 0.01, "txt": a["txt"]}

    model.model_options["transformer_options"]["patches"] = {"double_block": [diffsynth_like]}
    ref = F.sample(model, steps=6, cfg=1.0)
    for b in model.dm.transformer_blocks:
        b.calls = 0
    out = F.sample(apply(model, Schedule((0, 3), 6)), steps=6, cfg=1.0)
    assert all(torch.equal(a, b) for a, b in zip(ref, out))
    assert model.dm.transformer_blocks[0].calls == 2 * 6  # txt and img at every evaluation


def test_unsupported_models_get_the_supported_list():
    for dm, what in [(F.UNetModel(), "UNetModel"), (F.VaceWanModel(), "VaceWanModel")]:
        with pytest.raises(families.UnsupportedModelError, match=f"supports FLUX.1.*Wan2.2.*{what}.*VACE, camera, S2V, HuMo, Animate.*Remove the DPCache node"):
            block_patches.model_info(F.FakePatcher(dm))
    # one diffusion model class, several ComfyUI models: HunyuanImage 2.1 reuses HunyuanVideo's class
    with pytest.raises(families.UnsupportedModelError, match="HunyuanVideo in a HunyuanImage21 model"):
        block_patches.model_info(F.FakePatcher(F.HunyuanVideo(), base="HunyuanImage21"))
    with pytest.raises(families.UnsupportedModelError, match="WAN22_S2V"):
        block_patches.model_info(F.FakePatcher(F.WanModel(), base="WAN22_S2V"))
    with pytest.raises(families.UnsupportedModelError, match="unknown model family 'sd3'"):
        families.family("sd3")


@pytest.mark.parametrize("planned,model", [("flux", "chroma"), ("wan", "wan22_5b"), ("wan22_5b", "wan"), ("chroma", "flux")])
def test_schedule_of_another_family_is_refused(planned, model):
    with pytest.raises(ValueError, match=f"planned on a {planned} PACT.*calibrate a PACT for this model"):
        apply(FAKES[model](), Schedule((0, 2), 4, model_family=planned))


def test_calibrate_records_the_family(tmp_path, monkeypatch):
    from dpcache_core import load_pact
    from nodes import dpcache_nodes
    monkeypatch.setattr(dpcache_nodes, "calibration_folder", lambda: str(tmp_path))
    (m,) = DPCacheCalibrate().calibrate(FAKES["hunyuan_video"](), "hv", 1, False)
    F.sample(m, steps=5, cfg=1.0)
    _, meta = load_pact(str(tmp_path / "hv.safetensors"))
    assert meta["model_family"] == "hunyuan_video"
