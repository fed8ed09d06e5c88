"""A stream without [CLS] (region features): ``StreamSpec(summary="mean")`` makes the trimmers read
the mean of the stream's kept real tokens instead of position 0, in every mode."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_trimmers, shorter_rows
from toyvlm import Layer, _attn_inputs
from torch import nn

from trimkit import AttentionSpec, LayerSpec, ModelSpec, StreamSpec, TrimConfig, trim
from trimkit.plugins import get_registry

pytestmark = pytest.mark.usefixtures("one_thread")


class RegionVLM(nn.Module):
    """Region features (no [CLS], padded: images have different numbers of regions) and a question."""

    def __init__(self, dim=32, heads=4, depth=2, labels=5):
        super().__init__()
        self.region = nn.Linear(12, dim)
        self.embed = nn.Embedding(40, dim)
        self.cross_r = nn.ModuleList(Layer(dim, heads, True) for _ in range(depth))
        self.cross_t = nn.ModuleList(Layer(dim, heads, True) for _ in range(depth))
        self.head = nn.Linear(dim, labels)

    def forward(self, regions, region_mask, input_ids, attention_mask):
        r, t = self.region(regions), self.embed(input_ids)
        r_bias = (1.0 - region_mask[:, None, None, :].to(r.dtype)) * -1e9
        t_bias = (1.0 - attention_mask[:, None, None, :].to(t.dtype)) * -1e9
        for lr, lt in zip(self.cross_r, self.cross_t):
            r, t = lr(r, t, r_bias, t_bias), lt(t, r, t_bias, r_bias)
        return self.head(t[:, 0])


class RegionAdapter:
    def matches(self, m):
        return isinstance(m, RegionVLM)

    def describe(self, m):
        h = m.cross_r[0].attn.num_heads
        attns = [AttentionSpec("attn", "self", h, out="out", inputs=_attn_inputs),
                 AttentionSpec("cross", "cross", h, out="out", inputs=_attn_inputs)]
        layers = []
        for i in range(len(m.cross_r)):
            for stack, stream, other in (("cross_r", "regions", "text"), ("cross_t", "text", "regions")):
                layers.append(LayerSpec(f"{stack}.{i}", stream, "co", context="context", context_stream=other,
                                        hidden_token_args={"bias": -1}, context_token_args={"context_bias": -1},
                                        attentions=attns))
        return ModelSpec([StreamSpec("regions", padding_input="region_mask", summary="mean"),
                          StreamSpec("text", padding_input="attention_mask")], layers,
                         ["regions", "region_mask", "input_ids", "attention_mask"])

    def example_inputs(self, m, batch_size=1, seed=0):
        g = torch.Generator().manual_seed(seed)
        mask, tmask = shorter_rows(batch_size, 10, step=2), shorter_rows(batch_size, 6)
        return {"regions": torch.randn(batch_size, 10, 12, generator=g), "region_mask": mask,
                "input_ids": torch.randint(0, 40, (batch_size, 6), generator=g), "attention_mask": tmask}

    def build(self, size="tiny", seed=0):
        torch.manual_seed(seed)
        return RegionVLM().eval()


@pytest.fixture(scope="module")
def regions():
    get_registry().adapters.register("region_toy", RegionAdapter(), replace=True)
    model = RegionAdapter().build()
    return model, trim(model, TrimConfig(token_target=0.5, head_target=0.6), adapter="region_toy").eval()


def test_the_trimmers_read_the_mean_of_the_kept_regions(regions):
    model, tmodel = regions
    seen = []
    hook = tmodel.trimmers["cross_r_0"].token.register_forward_pre_hook(lambda mod, args: seen.append(args))
    x = RegionAdapter().example_inputs(model, 2, seed=1)
    try:
        with torch.no_grad(), tmodel.mode("hard"):
            tmodel(**x)
    finally:
        hook.remove()
    r = model.region(x["regions"])
    w = x["region_mask"].float()
    expected = (r * w[..., None]).sum(1) / w.sum(1, keepdim=True)  # padding regions excluded
    torch.testing.assert_close(seen[0][1], expected)
    assert not torch.allclose(seen[0][1], r[:, 0])
    assert "regions: summary = mean of its kept tokens (first token always kept), padding from input" in str(tmodel.plan)


def test_pooled_summaries_agree_across_modes(regions):
    model, tmodel = regions
    saved = {k: v.clone() for k, v in tmodel.trimmers.state_dict().items()}
    dropped = 0
    try:
        with torch.no_grad():
            x = RegionAdapter().example_inputs(model, 1, seed=2)
            torch.testing.assert_close(tmodel(**x), model(**x), atol=1e-5, rtol=0)
            for seed in range(3):
                randomize_trimmers(tmodel, seed)
                x = RegionAdapter().example_inputs(model, 1, seed=10 + seed)
                with tmodel.mode("hard"):
                    hard = tmodel(**x)
                    hard_keep = {r.key: float(r.keep) for r in tmodel.records}
                with tmodel.mode("remove"):
                    removed = tmodel(**x)
                    removed_keep = {r.key: float(r.keep) for r in tmodel.records}
                dropped += sum(k.startswith("cross_r.1") and v < 1 for k, v in removed_keep.items())
                torch.testing.assert_close(removed, hard, atol=1e-4, rtol=0)
                assert removed_keep == pytest.approx(hard_keep)  # the second layer's decisions read the pooled summary
                batch = RegionAdapter().example_inputs(model, 3, seed=20 + seed)
                with tmodel.mode("hard"):
                    hard = tmodel(**batch)
                    hard_keep = {r.key: r.keep.tolist() for r in tmodel.records}
                for mode in ("packed", "padded"):
                    with tmodel.mode(mode):
                        out = tmodel(**batch)
                        keep = {r.key: r.keep.tolist() for r in tmodel.records}
                    torch.testing.assert_close(out, hard, atol=1e-4, rtol=0, msg=mode)
                    for k in keep:
                        assert keep[k] == pytest.approx(hard_keep[k], abs=1e-6), (mode, k)
    finally:
        tmodel.trimmers.load_state_dict(saved)
    assert dropped > 0
