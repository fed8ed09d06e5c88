"""How trimkit sees BridgeTower (:class:`~trimkit_bridgetower.modeling.BridgeTowerForTrimming`).

Trimmed layers: the cross-modal encoder, ``bridgetower.cross_modal_text_layers.N`` (stream
``text``, padding from ``attention_mask``) and ``bridgetower.cross_modal_image_layers.N`` (stream
``vision``), site ``"cross"``, each with self-attention ``attention.self`` and cross-attention
``crossattention.self`` (per-head contexts; the layer applies ``output.dense``). The image layer
of step i reads the text layer's *input* of step i (METER's parallel update).

Link towers: before cross layer i + 1, BridgeTower adds the uni-modal states of the matching
encoder layer to the cross-modal states, ``link_tower(uni, cross, mask)``, at model level. The
uni-modal states have every token, so once a cross-modal stream has dropped tokens they are
gathered to the kept ones: argument ``hidden_states`` of each link tower is a
:class:`~trimkit.spec.TokenArg` of its stream (the token state is that of the latest cross-modal
layer of the stream before the call). In training (masks) nothing is needed: the link tower is per
token.

The uni-modal encoders are not trimmed: their layers after the split run in parallel with the
cross-modal ones, and a token dropped there would have to be dropped from a cross-modal stream
whose positions are counted differently (see the package docstring).
"""

from __future__ import annotations

from transformers import masking_utils

from trimkit.spec import AttentionSpec, AttnCall, LayerSpec, ModelSpec, StreamSpec, TokenArg

from .modeling import BridgeTowerForTrimming, padding_bias

__all__ = ["describe_bridgetower"]


def _self_inputs(args: tuple, kwargs: dict) -> AttnCall:
    """``BridgeTowerSelfAttention(hidden_states, attention_mask=...)``."""
    return AttnCall(args[0] if args else kwargs["hidden_states"], None, kwargs.get("attention_mask"))


def _cross_inputs(args: tuple, kwargs: dict) -> AttnCall:
    """``BridgeTowerCrossAttention(hidden_states, encoder_hidden_states=..., attention_mask=...)``."""
    return AttnCall(args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"],
                    kwargs.get("attention_mask"))


def _pair(y):
    return y, None


def describe_bridgetower(model: BridgeTowerForTrimming) -> ModelSpec:
    """The :class:`~trimkit.spec.ModelSpec` of a :class:`BridgeTowerForTrimming`."""
    bt = model.bridgetower
    if bt.config._attn_implementation != "eager":
        raise NotImplementedError(f"trimkit_bridgetower: attention implementation {bt.config._attn_implementation!r}; "
                                  "only 'eager' (transformers' only one for BridgeTower) is described")
    if bt.config.share_link_tower_layers:
        raise NotImplementedError("trimkit_bridgetower: share_link_tower_layers=True (one link tower called at every "
                                  "layer) is not supported")
    layers = []
    for i in range(len(bt.cross_modal_text_layers)):
        for stack, stream, other in (("cross_modal_text_layers", "text", "vision"),
                                     ("cross_modal_image_layers", "vision", "text")):
            heads = getattr(bt, stack)[i].attention.self.num_attention_heads
            layers.append(LayerSpec(
                f"bridgetower.{stack}.{i}", stream, "cross", hidden=0, context=1, context_stream=other,
                hidden_token_args={"attention_mask": -1}, context_token_args={"encoder_attention_mask": -1},
                attentions=[AttentionSpec("attention.self", "self", heads, inputs=_self_inputs, output=_pair),
                            AttentionSpec("crossattention.self", "cross", heads, inputs=_cross_inputs, output=_pair)]))
    links = [TokenArg(f"bridgetower.cross_modal_{kind}_link_tower.{i}", "hidden_states", stream, dim=1)
             for kind, stream in (("text", "text"), ("image", "vision"))
             for i in range(len(bt.cross_modal_text_link_tower))]
    spec = ModelSpec(
        streams=[StreamSpec("vision"), StreamSpec("text", padding_input="attention_mask")],
        layers=layers, input_names=["pixel_values", "input_ids", "attention_mask"],
        leaf_modules=["bridgetower.text_model.embeddings", "bridgetower.vision_model.visual.embeddings",
                      *(f"bridgetower.text_model.encoder.layer.{i}.attention.self"
                        for i in range(len(bt.text_model.encoder.layer)))],
        autowrap_functions=(masking_utils.create_bidirectional_mask, padding_bias), token_args=links,
    )
    spec.validate()
    return spec
