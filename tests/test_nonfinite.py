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


def test_an_eval_batch_that_runs_masked_says_so_once(toy_registry_module):
    from trimkit.model import MaskedBatchWarning

    model = ToyAdapter().build(seed=1).eval()
    tmodel = trim(model, TrimConfig(token_target=0.5), adapter="toy").eval()
    x = ToyAdapter().example_inputs(model, 2, seed=1)
    with torch.no_grad():
        with pytest.warns(MaskedBatchWarning, match=r"batch of 2 runs masked .*tmodel.inference = 'packed'"):
            tmodel(**x)
        assert tmodel.runtime.mode == "hard"
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error", MaskedBatchWarning)
            tmodel(**x)  # said once per model
            tmodel.inference = "packed"
            tmodel(**x)
        assert tmodel.runtime.mode == "packed"


def test_an_all_padding_row_in_a_packed_batch_is_named(toy):
    model, tmodel = toy
    x = ToyAdapter().example_inputs(model, 3, seed=1)
    x["attention_mask"][2] = 0
    with torch.no_grad(), tmodel.mode("packed"), pytest.raises(ValueError, match=r"instance\(s\) \[2\] .*no real token "
                                                                                  r"in stream 'text'"):
        tmodel(**x)


def test_padding_at_batch_1_counts_the_same_in_removed_and_masked_records(toy):
    """Eval runs batch 1 in mode remove: its keep ratios must not count padding (masked ones don't)."""
    from conftest import randomize_trimmers

    model, _ = toy
    tmodel = trim(model, TrimConfig(token_target=0.5), adapter="toy").eval()
    randomize_trimmers(tmodel, 3)
    x = ToyAdapter().example_inputs(model, 1, seed=4)
    x["attention_mask"][0, 4:] = 0  # a padded question at batch 1
    with torch.no_grad():
        with tmodel.mode("remove"):
            tmodel(**x)
            removed = {r.key: float(r.keep) for r in tmodel.records if r.kind == "token"}
        with tmodel.mode("hard"):
            tmodel(**x)
            hard = {r.key: float(r.keep) for r in tmodel.records if r.kind == "token"}
    assert removed == pytest.approx(hard) and min(removed.values()) < 1
