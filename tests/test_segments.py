"""Single-stream models: text and image tokens in one sequence, each segment with its own [CLS]
(ViLT's layout), described with ``StreamSpec(segments=...)`` and a padding mask the model builds
itself (``padding_source``). What the first vocabulary could not do: per-modality targets, keeping
the image [CLS] (it was trimmed at the first layer), a cross-modal policy between the segments,
and packed batches (padding could not be declared).
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_trimmers, shorter_rows
from toyvlm import Attention, _attn_inputs
from torch import nn

from trimkit import AttentionSpec, LayerSpec, ModelSpec, Segment, StreamSpec, TrimConfig, trim
from trimkit.plugins import get_registry

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT, PATCHES = 6, 16  # text tokens (incl. [CLS]); image patches (+ the image [CLS])


class JointEmbeddings(nn.Module):
    """text ([CLS] first) ++ image ([CLS] + patches); returns the sequence and its padding mask."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.word = nn.Embedding(40, dim)
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.img_cls = nn.Parameter(torch.randn(1, 1, dim))
        self.modality = nn.Embedding(2, dim)
        self.pos = nn.Parameter(torch.randn(1, TEXT + PATCHES + 1, dim) * 0.1)

    def forward(self, input_ids, attention_mask, pixel_values):
        t = self.word(input_ids) + self.modality.weight[0]
        v = self.patch(pixel_values).flatten(2).transpose(1, 2)
        v = torch.cat([self.img_cls.expand(v.shape[0], -1, -1), v], 1) + self.modality.weight[1]
        x = torch.cat([t, v], 1) + self.pos
        mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1]).expand(-1, v.shape[1])], 1)
        return x, mask


class JointLayer(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, bias):
        x = x + self.attn(self.n1(x), None, bias)
        return x + self.mlp(self.n2(x))


class JointVLM(nn.Module):
    def __init__(self, dim=32, heads=4, depth=3, labels=5):
        super().__init__()
        self.embed = JointEmbeddings(dim)
        self.layers = nn.ModuleList(JointLayer(dim, heads) for _ in range(depth))
        self.head = nn.Linear(dim, labels)

    def forward(self, input_ids, attention_mask, pixel_values):
        x, mask = self.embed(input_ids, attention_mask, pixel_values)
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -1e9
        for layer in self.layers:
            x = layer(x, bias)
        return self.head(x[:, 0])  # the pooler reads the text [CLS], as ViLT's


class JointAdapter:
    def __init__(self, vision_summary: str = "first") -> None:
        self.vision_summary = vision_summary

    def matches(self, m):
        return isinstance(m, JointVLM)

    def describe(self, m):
        heads = m.layers[0].attn.num_heads
        attn = AttentionSpec("attn", "self", heads, out="out", inputs=_attn_inputs)
        return ModelSpec(
            streams=[StreamSpec("joint", padding_source="embed[1]",
                                segments=[Segment("text", "input_ids:1"), Segment("vision", summary=self.vision_summary)])],
            layers=[LayerSpec(f"layers.{i}", "joint", hidden_token_args={"bias": -1}, attentions=[attn])
                    for i in range(len(m.layers))],
            input_names=["input_ids", "attention_mask", "pixel_values"])

    def example_inputs(self, m, batch_size=1, seed=0):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, 40, (batch_size, TEXT), generator=g)
        mask = shorter_rows(batch_size, TEXT)
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(batch_size, 3, 32, 32, generator=g)}

    def build(self, size="tiny", seed=0):
        torch.manual_seed(seed)
        return JointVLM().eval()


@pytest.fixture(scope="module")
def joint():
    get_registry().adapters.register("joint_toy", JointAdapter(), replace=True)
    model = JointAdapter().build()
    config = TrimConfig(token_target={"text": 0.8, "vision": 0.4}, head_target=0.6)
    return model, trim(model, config, adapter="joint_toy").eval()


def test_segments_get_their_own_trimmers_and_targets(joint):
    _, tmodel = joint
    assert tmodel.final_targets["layers.0:text"] == 0.8 and tmodel.final_targets["layers.0:vision"] == 0.4
    assert "layers.0" not in tmodel.final_targets  # no joint-stream record: the cost is per modality
    token = tmodel.trimmers["layers_0"].token
    assert type(token).__name__ == "SegmentTokenTrimmer" and token.names == ["text", "vision"]
    x = JointAdapter().example_inputs(tmodel.model, 1)
    with torch.no_grad():
        tmodel(**x)
    keys = [r.key for r in tmodel.records if r.kind == "token"]
    assert keys == [f"layers.{i}:{g}" for i in range(3) for g in ("text", "vision")]


def test_fresh_trimmers_are_the_model_in_every_mode(joint):
    model, tmodel = joint
    with torch.no_grad():
        for batch, modes in ((1, ("hard", "remove")), (3, ("hard", "packed", "padded"))):
            x = JointAdapter().example_inputs(model, batch, seed=batch)
            ref = model(**x)
            for mode in modes:
                with tmodel.mode(mode):
                    out = tmodel(**x)
                torch.testing.assert_close(out, ref, atol=1e-5, rtol=0, msg=f"{mode}, batch {batch}")
                assert all(float(r.keep.min()) == 1 for r in tmodel.records)


def test_masked_removed_and_packed_agree_and_keep_both_summaries(joint):
    model, tmodel = joint
    saved = {k: v.clone() for k, v in tmodel.trimmers.state_dict().items()}
    dropped = {"text": 0, "vision": 0}
    counts_differ = False
    try:
        for seed in range(3):
            randomize_trimmers(tmodel, seed)
            with torch.no_grad():
                one = JointAdapter().example_inputs(model, 1, seed=10 + seed)
                with tmodel.mode("hard"):
                    hard = tmodel(**one)
                    hard_keep = {r.key: float(r.keep) for r in tmodel.records}
                with tmodel.mode("remove"):
                    removed = tmodel(**one)
                    removed_keep = {r.key: float(r.keep) for r in tmodel.records}
                    last = [r for r in tmodel.records if r.key == "layers.2:vision"][0]
                torch.testing.assert_close(removed, hard, atol=1e-4, rtol=0)
                assert removed_keep == pytest.approx(hard_keep)
                assert {0, TEXT} <= set(last.index.tolist())  # both [CLS] tokens survive every layer
                for key, keep in removed_keep.items():
                    if ":" in key and keep < 1:
                        dropped[key.split(":")[1]] += 1
                batch = JointAdapter().example_inputs(model, 3, seed=20 + seed)
                with tmodel.mode("hard"):
                    hard = tmodel(**batch)
                    hard_keep = {r.key: r.keep.tolist() for r in tmodel.records}
                for mode in ("packed", "padded"):
                    with tmodel.mode(mode):
                        out = tmodel(**batch)
                    torch.testing.assert_close(out, hard, atol=1e-4, rtol=0, msg=mode)
                    got = {r.key: r.keep.tolist() for r in tmodel.records}
                    assert got.keys() == hard_keep.keys()
                    for key in got:
                        assert got[key] == pytest.approx(hard_keep[key], abs=1e-6), (mode, key)
                    counts_differ |= any(r.counts and len(set(r.counts)) > 1 for r in tmodel.records)
                    if mode == "packed":  # each segment's record counts its own kept tokens
                        for r in tmodel.records:
                            if r.kind == "token":
                                real = tmodel.runtime.segment_real["joint"][:, ["text", "vision"].index(r.key.split(":")[1])]
                                assert [round(c / max(float(n), 1), 6) for c, n in zip(r.counts, real)] == \
                                    pytest.approx(r.keep.tolist(), abs=1e-6)
    finally:
        tmodel.trimmers.load_state_dict(saved)
    assert dropped["text"] > 0 and dropped["vision"] > 0 and counts_differ


@pytest.mark.parametrize("mode", ["hard", "remove", "packed"])
def test_each_segment_reads_its_own_summary_and_the_other(joint, mode):
    """The cross-modal policy between segments: the vision trimmer gets the image [CLS] as its own
    summary and the text [CLS] as context, and the text trimmer the reverse, in every mode."""
    model, tmodel = joint
    seen = []
    token = tmodel.trimmers["layers_0"].token
    hooks = [p.register_forward_pre_hook(lambda mod, args: seen.append(args)) for p in token.policies]
    batch = 1 if mode == "remove" else 2
    x = JointAdapter().example_inputs(model, batch, seed=4)
    try:
        with torch.no_grad(), tmodel.mode(mode):
            tmodel(**x)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        h, _ = model.embed(**x)
    (_, text_self, text_ctx), (_, vis_self, vis_ctx) = seen
    torch.testing.assert_close(text_self, h[:, 0]), torch.testing.assert_close(text_ctx, h[:, TEXT])
    torch.testing.assert_close(vis_self, h[:, TEXT]), torch.testing.assert_close(vis_ctx, h[:, 0])


def test_plan_shows_the_segments(joint):
    _, tmodel = joint
    text = str(tmodel.plan)
    assert "joint: segments text (input_ids:1), vision (rest); each segment's first token always kept" in text
    assert "padding from 'embed[1]'" in text
    assert "tokens text keep 0.80, vision keep 0.40" in text


def test_bad_segment_descriptions_are_refused():
    with pytest.raises(ValueError, match="at least two segments"):
        StreamSpec("joint", segments=[Segment("text")])
    with pytest.raises(ValueError, match="only the last segment"):
        StreamSpec("joint", segments=[Segment("text"), Segment("vision", 4)])
    with pytest.raises(ValueError, match="length must be"):
        Segment("text", "input_ids")
    with pytest.raises(ValueError, match="used twice"):
        ModelSpec([StreamSpec("text"), StreamSpec("joint", segments=[Segment("text", 3), Segment("vision")])], [],
                  ["x"]).validate()


def test_a_segment_without_cls_reads_the_mean_of_its_kept_tokens():
    """Segment(summary="mean") (VisualBERT's visual embeddings, a decoder's image tokens): the text
    trimmer's context and the vision trimmer's own summary are the mean of the vision tokens kept,
    and masked, removed and packed still agree."""
    get_registry().adapters.register("joint_mean", JointAdapter("mean"), replace=True)
    model = JointAdapter().build(seed=1)
    tmodel = trim(model, TrimConfig(token_target={"text": 0.8, "vision": 0.4}), adapter="joint_mean").eval()
    seen = []
    hooks = [p.register_forward_pre_hook(lambda mod, args: seen.append(args))
             for p in tmodel.trimmers["layers_0"].token.policies]
    x = JointAdapter().example_inputs(model, 2, seed=4)
    try:
        with torch.no_grad(), tmodel.mode("hard"):
            tmodel(**x)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        h, _ = model.embed(**x)
    vision_mean = h[:, TEXT:].mean(1)
    (_, text_self, text_ctx), (_, vis_self, _) = seen
    torch.testing.assert_close(vis_self, vision_mean), torch.testing.assert_close(text_ctx, vision_mean)
    torch.testing.assert_close(text_self, h[:, 0])
    saved = {k: v.clone() for k, v in tmodel.trimmers.state_dict().items()}
    try:
        for seed in range(2):
            randomize_trimmers(tmodel, seed)
            with torch.no_grad():
                one = JointAdapter().example_inputs(model, 1, seed=30 + seed)
                with tmodel.mode("hard"):
                    hard, hard_keep = tmodel(**one), {r.key: float(r.keep) for r in tmodel.records}
                with tmodel.mode("remove"):
                    removed, removed_keep = tmodel(**one), {r.key: float(r.keep) for r in tmodel.records}
                torch.testing.assert_close(removed, hard, atol=1e-4, rtol=0)
                assert removed_keep == pytest.approx(hard_keep) and min(removed_keep.values()) < 1
                batch = JointAdapter().example_inputs(model, 3, seed=40 + seed)
                with tmodel.mode("hard"):
                    hard, hard_keep = tmodel(**batch), {r.key: r.keep.tolist() for r in tmodel.records}
                with tmodel.mode("packed"):
                    packed, keep = tmodel(**batch), {r.key: r.keep.tolist() for r in tmodel.records}
                torch.testing.assert_close(packed, hard, atol=1e-4, rtol=0)
                for k in keep:
                    assert keep[k] == pytest.approx(hard_keep[k], abs=1e-6), k
    finally:
        tmodel.trimmers.load_state_dict(saved)


def test_a_padding_mask_of_the_wrong_length_is_refused():
    """A new user declared the text mask as the padding of the joint sequence: it was accepted and
    ignored. It is now an error naming the stream and the shapes."""

    class Wrong(JointAdapter):
        def describe(self, m):
            spec = super().describe(m)
            stream = StreamSpec("joint", padding_input="attention_mask", segments=spec.streams[0].segments)
            return ModelSpec([stream], spec.layers, spec.input_names)

    get_registry().adapters.register("joint_wrong", Wrong(), replace=True)
    model = JointAdapter().build()
    tmodel = trim(model, TrimConfig(token_target=0.5), adapter="joint_wrong").eval()
    x = JointAdapter().example_inputs(model, 2, seed=1)
    for mode in ("hard", "packed"):
        with torch.no_grad(), tmodel.mode(mode), pytest.raises(ValueError, match=r"stream 'joint': its padding mask has"):
            tmodel(**x)
