"""Kept-head weights gathered once per kept set (trimkit.headcache) in mode remove: the same
outputs as running the kept heads in runs on weight views, and as the masked model; reused across
calls; invalidated when the weights change."""

from __future__ import annotations

import torch

from trimkit import TrimConfig, trim
from trimkit.ops import TrimAttention
from trimkit_meter import build_meter, meter_example_inputs


def _setup():
    torch.manual_seed(0)
    model = build_meter("tiny").eval()
    tmodel = trim(model, TrimConfig(token_target=1.0, head_target=0.5, trim_tokens=False)).eval()
    attns = [m for m in tmodel._graph.modules() if isinstance(m, TrimAttention)]
    # every head trimmer keeps heads 0, 2 and 3 of 4 (two runs: [0, 1) and [2, 4)), or 0 of 2 heads
    for key in [r.key for r in _records(tmodel) if r.kind == "head"]:
        n = next(r.total for r in _records(tmodel) if r.key == key)
        tmodel.runtime.forced[key] = torch.tensor([[1.0, -1.0, 1.0, 1.0][:n]]) if n == 4 else torch.tensor([[1.0, -1.0]])
    return model, tmodel, attns


def _records(tmodel):
    x = meter_example_inputs(tmodel.model, batch_size=1, seed=0)
    with torch.no_grad():
        tmodel(**x)
    return list(tmodel.records)


def test_cached_kept_heads_equal_runs_and_masked():
    model, tmodel, attns = _setup()
    assert any(m.spec.num_heads == 4 for m in attns)
    x = meter_example_inputs(model, batch_size=1, seed=1)
    with torch.no_grad():
        cached = tmodel(**x)
        assert sum(m.head_cache.misses for m in attns) > 0  # the gathered path ran
        hits0 = sum(m.head_cache.hits for m in attns)
        again = tmodel(**x)
        assert sum(m.head_cache.hits for m in attns) > hits0  # and was reused
        for m in attns:
            m.head_cache.max_elements = 0  # the runs-on-views path
            m.head_cache._sets.clear()
        runs = tmodel(**x)
        with tmodel.mode("hard"):
            masked = tmodel(**x)
    assert torch.equal(cached, again)
    torch.testing.assert_close(cached, runs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached, masked, rtol=1e-5, atol=1e-5)
    heads = [r for r in tmodel.records if r.kind == "head" and r.total == 4]
    assert heads and all(float(r.keep) == 0.75 for r in heads)


def test_cache_is_invalidated_when_weights_change_and_unused_with_grad():
    model, tmodel, attns = _setup()
    x = meter_example_inputs(model, batch_size=1, seed=2)
    with torch.no_grad():
        tmodel(**x)
        for m in attns:
            if m.spec.num_heads == 4:
                m.module.get_submodule(m.spec.q).weight.mul_(1.5)  # an in-place update (load_state_dict, optimizer)
        after = tmodel(**x)
        for m in attns:
            m.head_cache.max_elements = 0
        expected = tmodel(**x)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)
    for m in attns:
        m.head_cache.max_elements = 1 << 19
        m.head_cache._sets.clear()
    misses = sum(m.head_cache.misses for m in attns)
    tmodel(**x)  # autograd on: no cached copies (they would cut the weights' gradients)
    assert sum(m.head_cache.misses for m in attns) == misses


def test_writes_through_data_need_clear_caches_and_inference_mode_and_autocast_work():
    model, tmodel, attns = _setup()
    x = meter_example_inputs(model, batch_size=1, seed=3)
    with torch.no_grad():
        tmodel(**x)
        for m in attns:
            if m.spec.num_heads == 4:
                m.module.get_submodule(m.spec.q).weight.data.mul_(1.5)  # no version bump
        tmodel.clear_caches()
        after = tmodel(**x)
        for m in attns:
            m.head_cache.max_elements = 0
        expected = tmodel(**x)
        for m in attns:
            m.head_cache.max_elements = 1 << 19
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # inference tensors have no version counter
        tmodel.clear_caches()
        inf = tmodel(**x)
    torch.testing.assert_close(inf, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # lower-precision attention outputs
        low = tmodel(**x)
    assert torch.isfinite(low).all() and low.shape == expected.shape
