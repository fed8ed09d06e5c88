"""``trimkit.trim`` takes a transformers task model as it is: the adapter's ``root`` puts its thin
traceable wrapper around it (weights shared), so a user does not have to know the wrapper exists.

The bug feared: the raw model is trimmed through some other path than the wrapper (or not at all)
and computes something else. So each adapter's raw model, trimmed with fresh (keep-all) trimmers,
gives exactly what its wrapper gives untrimmed, trims the wrapper type, and shares its weights."""

from __future__ import annotations

import pytest
import torch

import trimkit
from trimkit import TrimConfig
from trimkit.plugins import get_registry

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


def _raw(name: str, wrapper: torch.nn.Module) -> torch.nn.Module:
    """The transformers model the adapter's ``build`` wrapped."""
    if name == "bridgetower":
        return wrapper.bridgetower
    if name == "blip":  # the VQA wrapper registers the model's parts, not the model: make one of its config
        from transformers import BlipForQuestionAnswering

        return BlipForQuestionAnswering(wrapper.config).eval()
    return wrapper.model


@pytest.mark.parametrize("name", ["vilt", "llava", "qwen2_vl", "bridgetower", "blip"])
def test_trim_takes_the_transformers_model_through_its_wrapper(name):
    adapter = get_registry().adapters.get(name)
    built = adapter.build(seed=0)
    raw = _raw(name, built)
    assert adapter.root(built) is built  # a wrapper is its own root
    tmodel = trimkit.trim(raw, TrimConfig(token_target=0.5))  # the adapter picked from the raw model
    assert tmodel.adapter_name == name and type(tmodel.model) is type(built)
    assert not tmodel.training and not tmodel.model.training  # as the raw model was (a new wrapper starts in train mode)
    shared = {id(p) for p in raw.parameters()}
    assert all(id(p) in shared for p in tmodel.model.parameters())  # the wrapper shares the raw model's weights
    x = adapter.example_inputs(tmodel.model, batch_size=1, seed=3)
    with torch.no_grad():
        reference = tmodel.model(**x)
        with tmodel.mode("hard"):  # fresh trimmers keep everything
            torch.testing.assert_close(tmodel(**x), reference, atol=1e-5, rtol=0)
        with tmodel.mode("remove"):
            torch.testing.assert_close(tmodel(**x), reference, atol=1e-5, rtol=0)
