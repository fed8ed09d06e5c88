"""Non-finite inputs: the plain model gives NaN; the trimmed model must not answer with finite,
confident logits (a NaN trimmer logit would count as "drop"). It raises, naming the trimmers."""

from __future__ import annotations

import pytest
import torch
from toyvlm import ToyAdapter

from trimkit import TrimConfig, trim
from trimkit.ops import NonFiniteError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(toy_registry_module):
    model = ToyAdapter().build(seed=0).eval()
    return model, trim(model, TrimConfig(token_target=0.5, head_target=0.5), adapter="toy").eval()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("batch,mode", [(1, "remove"), (3, "hard"), (3, "packed"), (3, "padded"), (2, "sample")])
def test_non_finite_pixels_raise_in_every_mode(toy, value, batch, mode):
    model, tmodel = toy
    x = ToyAdapter().example_inputs(model, batch, seed=1)
    x["pixel_values"][-1, :, :4, :4] = value  # one instance, one corner
    with torch.no_grad():
        assert not torch.isfinite(model(**x)).all()  # what the model itself gives
        with tmodel.mode(mode), pytest.raises(NonFiniteError, match=r"non-finite trimmer logits .*'vision\.0'"):
            tmodel(**x)


def test_the_full_model_still_propagates_nan(toy):
    model, tmodel = toy
    x = ToyAdapter().example_inputs(model, 1, seed=2)
    x["pixel_values"][0, 0, 0, 0] = float("nan")
    with torch.no_grad(), tmodel.full():
        assert torch.isnan(tmodel(**x)).any()


def test_finite_inputs_are_untouched(toy):
    model, tmodel = toy
    x = ToyAdapter().example_inputs(model, 3, seed=3)
    with torch.no_grad(), tmodel.mode("packed"):
        out = tmodel(**x)
    assert torch.isfinite(out).all() and tmodel.runtime.nonfinite  # checked, and nothing found
