"""The in-place Taylor update and the prediction into the model's dtype give exactly what the
straightforward whole-tensor code gives (issue 19 item 5), and really work in place."""
import math

import pytest
import torch

from dpcache_core import taylor
from dpcache_core.taylor import TaylorPredictor, element_blocks


class StraightforwardPredictor:
    """The whole-tensor predictor written out plainly: fresh tensors at every step."""

    def __init__(self, order, scheme, derivatives_after=None):
        self.order, self.scheme, self.derivatives_after = order, scheme, derivatives_after
        self.factors, self.steps = [], []

    def update(self, step, feature):
        keep = feature.dtype if feature.dtype in (torch.float16, torch.bfloat16) else torch.float32
        new = [feature.detach().to(keep, copy=True)]
        if self.derivatives_after is None or step > self.derivatives_after:
            for n in range(min(self.order, len(self.factors))):
                span = step - (self.steps[n] if self.scheme == "exact" else self.steps[0])
                new.append((new[n].float() - self.factors[n].float()) / span)
        self.factors = new
        self.steps = ([float(step)] + self.steps)[: self.order + 1]

    def predict(self, step):
        dt = step - self.steps[0]
        if self.scheme == "reference":
            weights = [dt**n / math.factorial(n) for n in range(len(self.factors))]
        else:
            weights, w = [], 1.0
            for n in range(len(self.factors)):
                weights.append(w)
                w *= step - self.steps[n]
        out = self.factors[0].float()
        for w, factor in zip(weights[1:], self.factors[1:]):
            out = out.add(factor, alpha=w)
        return out


def trajectory(steps, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    base, slope, curve = (torch.randn(shape, generator=g) for _ in range(3))
    return {s: (base + slope * s / 10 + curve * (s / 10) ** 2 + 0.01 * torch.randn(shape, generator=g)).to(dtype)
            for s in steps}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("scheme", ["reference", "exact"])
@pytest.mark.parametrize("derivatives_after", [None, 1])
@pytest.mark.parametrize("block", [None, 37])  # 37: many ragged blocks per tensor
def test_in_place_update_and_prediction_match_the_straightforward_code(dtype, order, scheme, derivatives_after, block, monkeypatch):
    if block:
        monkeypatch.setattr(taylor, "block_elements", lambda numel: block)
    keys, shape = [0, 1, 2, 4, 5, 9, 12, 16], (2, 33, 7)
    features = trajectory(keys, shape, dtype)
    mine = TaylorPredictor(order, scheme, derivatives_after)
    ref = StraightforwardPredictor(order, scheme, derivatives_after)
    for n, step in enumerate(keys):
        mine.update(step, features[step])
        ref.update(step, features[step])
        assert len(mine.factors) == len(ref.factors)
        for a, b in zip(mine.factors, ref.factors):
            assert a.dtype == b.dtype and torch.equal(a, b), (step, a.dtype)
        for t in (step + 1, step + 2.5):
            expected = ref.predict(t)
            assert torch.equal(mine.predict(t), expected)
            assert torch.equal(mine.predict(t, dtype=dtype), expected.to(dtype))
            model = torch.full((2, 40, 7), 7.0, dtype=dtype)  # a model tensor: the prediction goes into a slice
            mine.predict(t, out=model[:, 5:38])
            assert torch.equal(model[:, 5:38], expected.to(dtype))
            assert (model[:, :5] == 7).all() and (model[:, 38:] == 7).all()


def test_the_update_rewrites_its_buffers_in_place():
    predictor = TaylorPredictor(2, "exact")
    features = trajectory(range(6), (4, 5), torch.bfloat16)
    for step in range(3):  # the history grows to order + 1 factors
        predictor.update(step, features[step])
    buffers = {f.data_ptr() for f in predictor.factors}
    for step in range(3, 6):
        predictor.update(step, features[step])
        assert {f.data_ptr() for f in predictor.factors} == buffers  # the same storage, rotated
        assert [f.dtype for f in predictor.factors] == [torch.bfloat16, torch.float32, torch.float32]


def test_predictions_are_new_tensors_and_inputs_stay_untouched():
    predictor = TaylorPredictor(1)
    feature = torch.arange(12.0).reshape(3, 4)
    predictor.update(0, feature)
    predictor.update(1, feature * 2)
    assert torch.equal(feature, torch.arange(12.0).reshape(3, 4))
    a, b = predictor.predict(2), predictor.predict(2, dtype=torch.bfloat16)
    factors = {f.data_ptr() for f in predictor.factors}
    assert a.data_ptr() not in factors and b.data_ptr() not in factors
    a.add_(1)
    assert torch.equal(predictor.predict(2), a - 1)
    with pytest.raises(ValueError, match="prediction output has shape"):
        predictor.predict(2, out=torch.empty(3, 5))
    with pytest.raises(ValueError, match="shape changed"):
        predictor.update(3, torch.ones(4, 3))


@pytest.mark.parametrize("shape", [(), (5,), (3, 100), (2, 7, 9), (1, 4096, 3)])
@pytest.mark.parametrize("limit", [1, 8, 30, 1000])
def test_element_blocks_cover_every_element_once_within_the_limit(shape, limit):
    seen = torch.zeros(shape, dtype=torch.int64)
    for index in element_blocks(shape, limit):
        view = seen[index]
        assert view.numel() <= max(limit, 1) or view.dim() == 0
        assert view.untyped_storage().data_ptr() == seen.untyped_storage().data_ptr()  # a view, not a copy
        view += 1
    assert (seen == 1).all()


def test_a_feature_dtype_change_between_key_steps_matches_the_straightforward_code():
    features = trajectory(range(5), (3, 8), torch.float32)
    mine, ref = TaylorPredictor(2, "exact"), StraightforwardPredictor(2, "exact")
    for step, dtype in enumerate([torch.float32, torch.float32, torch.bfloat16, torch.bfloat16, torch.float16]):
        mine.update(step, features[step].to(dtype))
        ref.update(step, features[step].to(dtype))
        assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(mine.factors, ref.factors))
        assert torch.equal(mine.predict(step + 1), ref.predict(step + 1))
