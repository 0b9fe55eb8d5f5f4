"""At skipped evaluations the last block returns the prediction written straight into one new tensor
in the model's dtype (issue 19 item 5): the same values as the float32 prediction cast afterwards,
a fresh tensor at every call, the text tokens untouched."""
import pytest
import torch

from dpcache_core import Schedule
from nodes import families, run_state

TXT, IMG, DIM = 3, 5, 4


def open_call(run, args):
    """A model call of the run (run_state.RunState.open_call), its first block started and, for a joined
    stream, its join found (the text the block before returned is ``args["txt"]``)."""
    call = run.open_call(args["transformer_options"], args["img"])
    call.start(args)
    if run.spec.image_tokens == families.JOINED:
        call.txt_out = args["txt"]
        call.join(args)
    return call


def call_args(spec, img, txt, order=families.TXT_FIRST):
    joined = {families.TXT_FIRST: torch.cat((txt, img), 1), families.IMG_FIRST: torch.cat((img, txt), 1)}[order]
    x = joined if spec.image_tokens == families.JOINED else img
    return {"img": x, "txt": txt, "transformer_options": {"uuids": ["cond", "uncond"]}}


# one tensor stream keyed "img" (LTX-2's tuple of streams and Kandinsky 5's "x": tests/test_nodes_families.py)
SINGLE_STREAM = [f.name for f in families.FAMILIES if f.image_tokens != families.STREAMS and f.stream_key == "img"]
CASES = [(n, o) for n in SINGLE_STREAM for o in ((families.TXT_FIRST, families.IMG_FIRST)
                                                 if families.family(n).image_tokens == families.JOINED else (families.TXT_FIRST,))]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name,order", CASES)
def test_skipped_evaluation_returns_the_prediction_in_the_models_dtype(name, order, dtype):
    spec = families.family(name)
    run = run_state.ApplyRun(name, Schedule((0, 1, 2), 5, order=2, first_full_steps=1))
    g = torch.Generator().manual_seed(0)
    txt = torch.randn(4, TXT, DIM, generator=g).to(dtype)
    keys = {}
    for t in range(3):  # key evaluations: the (fake) last block doubles its input
        run.start_evaluation()
        img = torch.randn(4, IMG, DIM, generator=g).to(dtype)
        args = call_args(spec, img, txt, order)
        call = open_call(run, args)
        out = call.last_block(args, {"original_block": lambda a: {"img": a["img"] * 2, "txt": a["txt"]}}, None)
        run.close_call(call)  # feeds the caches
        keys[t] = spec.cache_point(out["img"], call.where)
    assert run.order == (order if spec.image_tokens == families.JOINED else None)
    run.start_evaluation()
    x = call_args(spec, torch.full((4, IMG, DIM), 9.0, dtype=dtype), txt, order)
    call = open_call(run, x)
    where = call.where
    assert not call.compute
    first = call.last_block(x, {}, None)["img"]
    again = call.last_block(x, {}, None)["img"]
    # the float32 prediction per stream, concatenated and cast: what the code did before
    expected = torch.cat([run.cache.predict(s) for s in call.streams]).to(dtype)
    assert first.dtype == dtype and first.shape == x["img"].shape
    assert torch.equal(spec.cache_point(first, where), expected)
    assert not torch.equal(expected, spec.cache_point(x["img"], where))
    assert torch.equal(first, again) and first.data_ptr() != again.data_ptr()  # a new tensor per call
    assert first.data_ptr() != x["img"].data_ptr()
    if spec.image_tokens == families.JOINED:  # the text tokens come back as they went in
        rest = first[:, :TXT] if order == families.TXT_FIRST else first[:, IMG:]
        assert torch.equal(rest, txt)
    first.add_(1)  # the model may modify the block output in place: the cache is not affected
    assert torch.equal(spec.cache_point(call.last_block(x, {}, None)["img"], where), expected)


def rising_features(dtype):
    """Key features climbing towards float16's limit (+-65504): an extrapolation passes it."""
    base = torch.linspace(-1.0, 1.0, 64).reshape(1, 16, 4)
    return [(t, (base * (20000.0 + 10000.0 * k)).to(dtype)) for k, t in enumerate((0.0, 0.1, 0.2, 0.3, 0.4))]


@pytest.mark.parametrize("forecaster", ["taylor", "spectral"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_prediction_past_the_dtype_range_is_clamped_to_finite(forecaster, dtype):
    from dpcache_core import SpectralPredictor, TaylorPredictor
    predictor = TaylorPredictor(1, "reference") if forecaster == "taylor" else SpectralPredictor()
    for t, feature in rising_features(dtype):
        predictor.update(t * 10 if forecaster == "taylor" else t, feature)
    out = torch.empty(1, 16, 4, dtype=dtype)
    at = 10.0 if forecaster == "taylor" else 1.0  # the last evaluation, six hops after the last key
    predictor.predict(at, out=out)
    wide = predictor.predict(at)  # float32: the value past the limit
    assert torch.isfinite(out).all()  # float16 wrote inf here before
    normed = torch.nn.functional.layer_norm(out.float(), (4,))
    assert torch.isfinite(normed).all()
    if dtype == torch.float16:
        assert wide.abs().max() > 65504 and out.abs().max() == 65504
    else:  # bfloat16 has float32's range: nothing clamped
        assert torch.equal(out, wide.to(dtype))
