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


@pytest.mark.parametrize("order", [families.TXT_FIRST, families.IMG_FIRST])
@pytest.mark.parametrize("name", [f.name for f in families.FAMILIES])
def test_cache_point_and_prediction_round_trip(name, order):
    """Joined streams in either token order (found from the text, as at run time), a tuple of streams
    (LTX-2: video and audio, flattened into one cache point), and the stream key ("x": Kandinsky 5)."""
    spec = families.family(name)
    img, txt, audio = torch.randn(2, 6, 4), torch.randn(2, 3, 4), torch.randn(2, 5, 2)
    where = None
    if spec.image_tokens == families.JOINED:
        x = torch.cat((txt, img), 1) if order == families.TXT_FIRST else torch.cat((img, txt), 1)
        assert families.token_order(x, txt) == order
        where = spec.locate(order, 3, 9)
        image = img
    elif spec.image_tokens == families.STREAMS:
        x = (img, audio)
        image = torch.cat((img.reshape(2, -1), audio.reshape(2, -1)), 1)
    else:
        x, image = img, img
    args = {spec.stream_key: x, "txt": txt}
    assert torch.equal(spec.cache_point(x, where), image)
    out, view = spec.prediction_output(args, where)
    view.copy_(image * 2)
    back = spec.passthrough(args, out)
    assert torch.equal(spec.cache_point(back[spec.stream_key], where), image * 2)
    assert ("txt" in back) == spec.reads_txt
    if spec.image_tokens == families.STREAMS:  # each stream whole and contiguous, in its own shape
        assert [tuple(s.shape) for s in back["img"]] == [(2, 6, 4), (2, 5, 2)] and all(s.is_contiguous() for s in back["img"])
    if spec.image_tokens == families.JOINED:  # the text comes back untouched
        text = back["img"][:, :3] if order == families.TXT_FIRST else back["img"][:, 6:]
        assert torch.equal(text, txt)


def test_token_order_of_text_found_at_neither_end_keeps_the_whole_stream():
    img, txt = torch.randn(1, 6, 4), torch.randn(1, 3, 4)
    assert families.token_order(torch.cat((img[:, :3], txt, img[:, 3:]), 1), txt) == families.ALL_TOKENS
    assert families.token_order(img, None) == families.ALL_TOKENS


def test_direct_block_maps_the_args_onto_the_blocks_own_parameter_names():
    """Kandinsky 5 in ComfyUI 0.33: the model passes x/context/time_embed/freqs; the block takes
    visual_embed/text_embed/time_embed/freqs. Same names go by name, the rest in order."""
    class Block(torch.nn.Module):
        def forward(self, visual_embed, text_embed, time_embed, freqs, transformer_options={}):
            return visual_embed * 10 + text_embed + time_embed * 100 + freqs * 1000

    call = families.direct_block(Block(), "x")
    args = {"x": torch.tensor(1.0), "context": torch.tensor(2.0), "time_embed": torch.tensor(3.0),
            "freqs": torch.tensor(4.0), "transformer_options": {}}
    assert call(args) == {"x": torch.tensor(4312.0)}


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


@pytest.mark.parametrize("img_first", [True, False], ids=["img-txt (ComfyUI 0.3.64)", "txt-img (ComfyUI 0.33)"])
def test_hunyuan_video_token_order_is_found_at_run_time(img_first):
    """HunyuanVideo's single stream is cat(img, txt) in ComfyUI 0.3.64 and cat(txt, img) in 0.33: the
    prediction must land on the image tokens in both (the order is read from the run, not assumed)."""
    dm = F.HunyuanVideo()
    dm.img_first = img_first
    model = F.FakePatcher(dm)
    out = F.sample(apply(model, Schedule((0, 2), 4, order=1, first_full_steps=1)), steps=4, cfg=2.0)
    torch.testing.assert_close(out[3], 1.5 * out[2] - 0.5 * out[0])
