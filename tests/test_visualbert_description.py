"""transformers' VisualBERT described, not wrapped: one sequence of text then region embeddings
(no visual [CLS]), padding per segment from the model's own inputs, the HF mask function
autowrapped. Written from the guide by a new user; it used to lose its padding mask silently (fx
rebuilt the config the mask function reads) and needed a wrapper just to name the joint mask."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_trimmers, shorter_rows

from trimkit import AttentionSpec, AttnCall, LayerSpec, ModelSpec, Segment, StreamSpec, TrimConfig, trim
from trimkit.plugins import get_registry

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


def _self_inputs(args, kwargs):  # VisualBertSelfAttention(hidden_states, attention_mask=None, output_attentions=False)
    call = dict(zip(("hidden_states", "attention_mask"), args)) | kwargs
    return AttnCall(call["hidden_states"], None, call.get("attention_mask"))


class VisualBertAdapter:
    def matches(self, model):
        return isinstance(model, transformers.VisualBertModel)

    def describe(self, model):
        from transformers.models.visual_bert import modeling_visual_bert

        attn = AttentionSpec("attention.self", "self", model.config.num_attention_heads, q="query", k="key",
                             v="value", out=None, inputs=_self_inputs, output=lambda y: (y,))
        return ModelSpec(
            streams=[StreamSpec("joint", segments=[
                Segment("text", "input_ids:1", padding_input="attention_mask"),
                Segment("vision", summary="mean", padding_input="visual_attention_mask")])],
            layers=[LayerSpec(f"encoder.layer.{i}", "joint", hidden="hidden_states",
                              hidden_token_args={"attention_mask": -1}, attentions=[attn])
                    for i in range(model.config.num_hidden_layers)],
            input_names=["input_ids", "attention_mask", "visual_embeds", "visual_attention_mask"],
            leaf_modules=["embeddings"],  # position ids sliced by a traced length
            autowrap_functions=[modeling_visual_bert.create_bidirectional_mask])

    def example_inputs(self, model, batch_size=1, seed=0):
        g = torch.Generator().manual_seed(seed)
        mask, vmask = shorter_rows(batch_size, 6), shorter_rows(batch_size, 5)
        ids = torch.randint(1, model.config.vocab_size, (batch_size, 6), generator=g).masked_fill(mask == 0, 0)
        return {"input_ids": ids, "attention_mask": mask, "visual_attention_mask": vmask,
                "visual_embeds": torch.randn(batch_size, 5, model.config.visual_embedding_dim, generator=g)}

    def build(self, size="tiny", seed=0):
        torch.manual_seed(seed)
        config = transformers.VisualBertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=64, visual_embedding_dim=12, max_position_embeddings=64)
        return transformers.VisualBertModel(config).eval()


@pytest.fixture(scope="module")
def visualbert():
    get_registry().adapters.register("visualbert_toy", VisualBertAdapter(), replace=True)
    model = VisualBertAdapter().build()
    return model, trim(model, TrimConfig(token_target={"text": 0.8, "vision": 0.5}), adapter="visualbert_toy").eval()


def _pooled(out):
    return out["pooler_output"] if isinstance(out, dict) else out.pooler_output


def test_padding_reaches_the_model_and_the_trimmers(visualbert):
    model, tmodel = visualbert
    x = VisualBertAdapter().example_inputs(model, 3, seed=1)
    with torch.no_grad():
        ref = _pooled(model(**x))
        for mode in ("hard", "packed"):
            with tmodel.mode(mode):
                torch.testing.assert_close(_pooled(tmodel(**x)), ref, atol=1e-5, rtol=0, msg=mode)
        joint = tmodel.runtime.padding["joint"]
    expected = torch.cat([x["attention_mask"], x["visual_attention_mask"]], 1)
    assert torch.equal(joint.cpu(), expected)  # both segments' padding, joined


def test_masked_removed_and_packed_agree(visualbert):
    model, tmodel = visualbert
    saved = {k: v.clone() for k, v in tmodel.trimmers.state_dict().items()}
    try:
        for seed in range(2):
            randomize_trimmers(tmodel, seed)
            with torch.no_grad():
                one = VisualBertAdapter().example_inputs(model, 1, seed=10 + seed)
                with tmodel.mode("hard"):
                    hard = _pooled(tmodel(**one))
                with tmodel.mode("remove"):
                    removed = _pooled(tmodel(**one))
                assert any(float(r.keep) < 1 for r in tmodel.records)
                torch.testing.assert_close(removed, hard, atol=1e-4, rtol=0)
                batch = VisualBertAdapter().example_inputs(model, 3, seed=20 + seed)
                with tmodel.mode("hard"):
                    hard = _pooled(tmodel(**batch))
                with tmodel.mode("packed"):
                    torch.testing.assert_close(_pooled(tmodel(**batch)), hard, atol=1e-4, rtol=0)
    finally:
        tmodel.trimmers.load_state_dict(saved)


def test_a_segment_mask_of_the_wrong_length_is_refused(visualbert):
    model, tmodel = visualbert
    x = VisualBertAdapter().example_inputs(model, 2, seed=3)
    x["visual_attention_mask"] = x["visual_attention_mask"][:, :3]
    with pytest.raises(ValueError, match=r"Segment\('vision'\)\.padding_input 'visual_attention_mask' has shape \(2, 3\)"):
        with torch.no_grad(), tmodel.mode("hard"):
            tmodel(**x)
