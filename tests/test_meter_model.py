"""METER model, checkpoint conversion and trimkit description (tiny config; base only on meta)."""

from __future__ import annotations

import argparse
import ast
import operator
import re
from collections.abc import Iterable
from pathlib import Path

import pydantic
import pytest
import torch
import torch.fx as fx
from torch import nn

from trimkit._compat import ensure_torchvision

ensure_torchvision()

from open_clip.transformer import QuickGELU, ResidualAttentionBlock  # noqa: E402

from trimkit_meter.convert import (  # noqa: E402
    MeterCheckpointError,
    convert_meter_checkpoint,
    convert_meter_state_dict,
    load_meter_checkpoint,
)
from trimkit_meter.modeling import (  # noqa: E402
    DEFAULT_NUM_LABELS,
    METER_BASE,
    METER_TINY,
    MeterAttention,
    MeterConfig,
    MeterCrossLayer,
    MeterModel,
    build_meter,
    padding_bias,
)
from trimkit_meter.spec import describe_meter, meter_example_inputs  # noqa: E402

TASKS = ["vqa", "nlvr2", "snli_ve", "itm"]


def _model(task: str = "vqa", seed: int = 0) -> MeterModel:
    torch.manual_seed(seed)
    return build_meter("tiny", task=task).eval()


class _LeafTracer(fx.Tracer):
    """Keeps the given module paths (and torch.nn modules) as single calls."""

    def __init__(self, leaves: set[str] = frozenset(), leaf_types: tuple[type, ...] = ()) -> None:
        super().__init__()
        self.leaves, self.leaf_types = set(leaves), leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)


def _trace_as_trimkit_does(model: MeterModel) -> fx.GraphModule:
    spec = describe_meter(model)
    leaves = set(spec.leaf_modules) | {layer.path for layer in spec.layers}
    graph = _LeafTracer(leaves).trace(model, concrete_args=dict(spec.concrete_args) or None)
    return fx.GraphModule(model, graph)


# --- config ------------------------------------------------------------------------------------
def test_presets():
    assert (METER_BASE.image_size, METER_BASE.patch_size, METER_BASE.vision_width) == (288, 16, 768)
    assert METER_BASE.vision_layers == 11  # METER's CLIP copy drops ViT-B/16's last block
    assert (METER_BASE.vocab_size, METER_BASE.text_hidden, METER_BASE.text_layers) == (50265, 768, 12)
    assert (METER_BASE.cross_layers, METER_BASE.hidden_size, METER_BASE.cross_heads) == (6, 768, 12)
    assert METER_BASE.cross_intermediate == METER_BASE.text_intermediate == 3072
    assert METER_BASE.num_patches == 18 * 18
    assert METER_TINY.num_labels == DEFAULT_NUM_LABELS["vqa"] == 3129


@pytest.mark.parametrize("task", TASKS)
def test_num_labels_default_per_task(task):
    assert MeterConfig(task=task).num_labels == DEFAULT_NUM_LABELS[task]
    assert build_meter("tiny", task=task).config.num_labels == DEFAULT_NUM_LABELS[task]
    assert build_meter("tiny", task=task, num_labels=7).config.num_labels == 7


@pytest.mark.parametrize(("overrides", "field"), [
    ({"image_size": 100}, "image_size"),  # not a multiple of patch_size 16
    ({"task": "captioning"}, "task"),
    ({"vision_width": 0}, "vision_width"),
    ({"hidden_size": 66}, "hidden_size"),  # not divisible by cross_heads
    ({"max_text_len": 600}, "text_max_positions"),
    ({"cross_layerz": 3}, "cross_layerz"),  # extra fields are forbidden
    ({"num_labels": 0}, "num_labels"),
])
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(pydantic.ValidationError, match=field):
        MeterConfig(**{**METER_TINY.model_dump(exclude={"num_labels"}), **overrides})
    with pytest.raises(pydantic.ValidationError, match=field):
        build_meter("tiny", **overrides)


def test_config_is_frozen_and_size_checked():
    with pytest.raises(pydantic.ValidationError):
        METER_TINY.image_size = 32
    with pytest.raises(ValueError, match="size"):
        build_meter("huge")


def test_base_builds_on_meta():
    with torch.device("meta"):
        model = build_meter("base")
    assert len(model.vit_model.transformer.resblocks) == 11
    assert model.vit_model.positional_embedding.shape == (18 * 18 + 1, 768)
    assert model.vit_model.proj is None
    assert len(model.cross_modal_image_layers) == len(model.cross_modal_text_layers) == 6
    assert model.text_transformer.embeddings.word_embeddings.weight.shape == (50265, 768)
    assert model.vqa_classifier[3].weight.shape == (3129, 1536)
    assert isinstance(model.vit_model.transformer.resblocks[0].mlp.gelu, QuickGELU)  # CLIP's activation
    assert 300e6 < sum(p.numel() for p in model.parameters()) < 350e6


# --- forward -----------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("batch", [1, 3])
def test_forward_shapes(task, batch):
    model = _model(task)
    inputs = meter_example_inputs(model, batch_size=batch)
    assert ("pixel_values_2" in inputs) == (task == "nlvr2")
    with torch.no_grad():
        logits = model(**inputs)
    assert logits.shape == (batch, model.config.num_labels)
    assert torch.isfinite(logits).all()
    head = {"vqa": "vqa_classifier", "nlvr2": "nlvr2_classifier", "snli_ve": "snli_classifier", "itm": "itm_score"}
    assert model.head is getattr(model, head[task])
    assert {h for h in head.values() if hasattr(model, h)} == {head[task]}


def test_nlvr2_is_two_meter_passes():
    """Encoding the text once and each image with it equals METER's two separate passes."""
    model = _model("nlvr2")
    inputs = meter_example_inputs(model, batch_size=2)
    captured = []
    hook = model.nlvr2_classifier.register_forward_hook(lambda m, args, out: captured.append(args[0]))
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    h = model.config.hidden_size
    assert captured[0].shape == (2, 4 * h)
    assert model.token_type_embeddings.num_embeddings == 3

    def one_pass(pixels, image_type):  # METER's infer() for one (image, text) pair
        t = model.cross_modal_text_transform(model.text_transformer(inputs["input_ids"], inputs["attention_mask"]))
        v = model.embed_image(pixels)
        for blk in model.vit_model.transformer.resblocks:
            v = blk(v)
        v = model.cross_modal_image_transform(model.vit_model.ln_post(v))
        t = t + model.token_type_embeddings.weight[0]
        v = v + model.token_type_embeddings.weight[image_type]
        tb, vb = padding_bias(inputs["attention_mask"], t), torch.zeros(v.shape[0], 1, 1, v.shape[1])
        for il, tl in zip(model.cross_modal_image_layers, model.cross_modal_text_layers):
            v, t = il(v, t, vb, tb), tl(t, v, tb, vb)
        return torch.cat([model.cross_modal_text_pooler(t), model.cross_modal_image_pooler(v)], -1)

    with torch.no_grad():
        expected = torch.cat([one_pass(inputs["pixel_values"], 1), one_pass(inputs["pixel_values_2"], 2)], -1)
    torch.testing.assert_close(captured[0], expected, rtol=1e-5, atol=1e-5)


def test_pixel_values_2_checked():
    with pytest.raises(ValueError, match="pixel_values_2"):
        _model("nlvr2")(**{k: v for k, v in meter_example_inputs(_model("nlvr2")).items() if k != "pixel_values_2"})
    vqa = _model("vqa")
    inputs = meter_example_inputs(vqa)
    with pytest.raises(ValueError, match="pixel_values_2"):
        vqa(**inputs, pixel_values_2=inputs["pixel_values"])


def test_padding_is_ignored():
    """Padded text positions do not change the logits (their bias is finfo.min everywhere)."""
    model = _model("vqa")
    inputs = meter_example_inputs(model, batch_size=1)
    inputs["attention_mask"][0, 10:] = 0
    inputs["input_ids"][0, 10:] = model.config.pad_token_id
    with torch.no_grad():
        a = model(**inputs)
        inputs["input_ids"][0, 12:] = 57  # change padded ids: same logits
        b = model(**inputs)
        short = model(inputs["pixel_values"], inputs["input_ids"][:, :10], inputs["attention_mask"][:, :10])
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, short, rtol=1e-5, atol=1e-5)


def test_padding_bias():
    mask = torch.tensor([[1, 1, 0]])
    bias = padding_bias(mask, torch.zeros(1, dtype=torch.bfloat16))
    assert bias.shape == (1, 1, 1, 3) and bias.dtype == torch.bfloat16
    assert bias[0, 0, 0, :2].eq(0).all() and bias[0, 0, 0, 2] == torch.finfo(torch.bfloat16).min


def test_meter_attention_matches_manual():
    torch.manual_seed(0)
    attn = MeterAttention(16, 4).eval()
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    bias = torch.zeros(2, 1, 1, 7)
    bias[1, ..., 5:] = torch.finfo(torch.float32).min

    def manual(q_in, kv_in, b):
        q, k, v = (lin(t).view(2, -1, 4, 4).transpose(1, 2) for lin, t in
                   ((attn.query, q_in), (attn.key, kv_in), (attn.value, kv_in)))
        p = (q @ k.transpose(-1, -2) / 2.0 + (0 if b is None else b)).softmax(-1)
        return (p @ v).transpose(1, 2).reshape(2, -1, 16)

    torch.testing.assert_close(attn(x, ctx, bias), manual(x, ctx, bias))
    torch.testing.assert_close(attn(x), manual(x, x, None))


# --- torch.fx --------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_fx_trace_equals_eager(task):
    model = _model(task)
    gm = _trace_as_trimkit_does(model)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    spec = describe_meter(model)
    per_example = 2 if task == "nlvr2" else 1  # NLVR2: one call per (image, text) pair
    for layer in spec.layers:
        assert calls.count(layer.path) == per_example, layer.path
    assert calls.count("text_transformer") == 1
    assert calls.index("text_transformer") < calls.index("vit_model.transformer.resblocks.0")
    inputs = meter_example_inputs(model, batch_size=3, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs), model(**inputs), rtol=0, atol=0)


def test_cross_layer_traces_standalone():
    model = _model()
    layer = model.cross_modal_image_layers[0]
    assert isinstance(layer, MeterCrossLayer)
    graph = _LeafTracer(leaf_types=(MeterAttention,)).trace(layer)  # all four arguments are tensors
    gm = fx.GraphModule(layer, graph)
    calls = [(n.target, n.args) for n in graph.nodes if n.op == "call_module" and n.target.endswith(".self")]
    assert [c[0] for c in calls] == ["attention.self", "crossattention.self"]
    assert len(calls[0][1]) == 3 and calls[0][1][1] is None  # self-attention: (x, None, bias)
    v, t = torch.randn(2, 17, 64), torch.randn(2, 16, 64)
    vb, tb = torch.zeros(2, 1, 1, 17), padding_bias(torch.tensor([[1] * 16, [1] * 9 + [0] * 7]), t)
    with torch.no_grad():
        torch.testing.assert_close(gm(v, t, vb, tb), layer(v, t, vb, tb), rtol=0, atol=0)


def test_resblock_traces_standalone():
    block = _model().vit_model.transformer.resblocks[0]
    assert isinstance(block, ResidualAttentionBlock)
    # open_clip's forward(q_x, k_x=None, v_x=None, attn_mask=None) branches on its optional inputs
    graph = fx.Tracer().trace(block, concrete_args={"k_x": None, "v_x": None, "attn_mask": None})
    gm = fx.GraphModule(block, graph)
    (mha,) = [n for n in graph.nodes if n.op == "call_module" and n.target == "attn"]
    assert mha.args[0] is mha.args[1] is mha.args[2]
    x = torch.randn(2, 17, 64)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), block(x), rtol=0, atol=0)


# --- trimkit description ---------------------------------------------------------------------
@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
def test_describe_meter_paths_resolve(task):
    model = _model(task)
    spec = describe_meter(model)
    spec.validate()
    assert [s.name for s in spec.streams] == ["vision", "text"]
    assert spec.stream("text").padding_input == "attention_mask"
    for path in spec.leaf_modules:
        model.get_submodule(path)
    for layer in spec.layers:
        module = model.get_submodule(layer.path)
        if layer.context_source:
            model.get_submodule(layer.context_source)
        for att in layer.attentions:
            attn = module.get_submodule(att.path)
            if att.in_proj:
                assert getattr(attn, f"{att.in_proj}_weight").shape[0] == 3 * getattr(attn, att.out).in_features
            else:
                for name in (att.q, att.k, att.v):
                    assert isinstance(attn.get_submodule(name), nn.Linear)
            assert att.num_heads == attn.num_heads
    c = model.config
    uni = [l for l in spec.layers if l.site == "uni"]
    assert [l.path for l in uni] == [f"vit_model.transformer.resblocks.{i}" for i in range(c.vision_layers)]
    assert all(l.stream == "vision" and l.context_stream == "text" for l in uni)
    cross = [l for l in spec.layers if l.site == "cross"]
    assert len(cross) == 2 * c.cross_layers
    assert {(l.stream, l.context_stream) for l in cross} == {("vision", "text"), ("text", "vision")}
    assert all(l.hidden_token_args == {2: -1} and l.context_token_args == {3: -1} for l in cross)
    assert all([a.kind for a in l.attentions] == ["self", "cross"] for l in cross)
    if task == "nlvr2":
        assert list(spec.input_names)[-1] == "pixel_values_2" and not spec.concrete_args
    else:
        assert "pixel_values_2" not in spec.input_names and spec.concrete_args == {"pixel_values_2": None}


def test_attention_specs_reproduce_the_modules():
    """Each AttentionSpec's inputs/output adapters + own weights give the module's own result."""
    model = _model()
    spec = describe_meter(model)
    torch.manual_seed(1)

    def attend(att, call, module):
        x = call.x
        ctx = x if call.context is None else call.context
        if att.in_proj:
            wq, wk, wv = getattr(module, f"{att.in_proj}_weight").chunk(3)
            bq, bk, bv = getattr(module, f"{att.in_proj}_bias").chunk(3)
        else:
            (wq, bq), (wk, bk), (wv, bv) = ((getattr(module, n).weight, getattr(module, n).bias)
                                            for n in (att.q, att.k, att.v))
        h = att.num_heads

        def heads(t, w, b):
            return nn.functional.linear(t, w, b).view(t.shape[0], t.shape[1], h, -1).transpose(1, 2)

        y = nn.functional.scaled_dot_product_attention(heads(x, wq, bq), heads(ctx, wk, bk), heads(ctx, wv, bv),
                                                       attn_mask=call.bias)
        y = y.transpose(1, 2).reshape(x.shape)
        if att.out:
            y = getattr(module, att.out)(y)
        return att.output(y)

    vit_layer, cross_layer = spec.layers[0], spec.layers[-1]
    block = model.get_submodule(vit_layer.path)
    (att,) = vit_layer.attentions
    x = torch.randn(2, 17, 64)
    args, kwargs = (x, x, x), {"need_weights": False, "attn_mask": None}
    with torch.no_grad():
        ours, theirs = attend(att, att.inputs(args, kwargs), block.attn), block.attn(*args, **kwargs)
    torch.testing.assert_close(ours[0], theirs[0])
    assert ours[1] is None and theirs[1] is None
    layer = model.get_submodule(cross_layer.path)
    t, v = torch.randn(2, 16, 64), torch.randn(2, 17, 64)
    bias = padding_bias(torch.tensor([[1] * 16, [1] * 5 + [0] * 11]), t)
    for att, args, kwargs in ((cross_layer.attentions[0], (t, None, bias), {}),
                              (cross_layer.attentions[1], (t,), {"context": v, "bias": None})):
        module = layer.get_submodule(att.path)
        with torch.no_grad():
            torch.testing.assert_close(attend(att, att.inputs(args, kwargs), module), module(*args, **kwargs))


def test_example_inputs():
    model = _model()
    c = model.config
    inputs = meter_example_inputs(model, batch_size=4, seed=3)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert inputs["pixel_values"].shape == (4, 3, c.image_size, c.image_size)
    assert ids.shape == mask.shape == (4, c.max_text_len)
    assert (ids[:, 0] == c.cls_token_id).all() and mask[:, 0].all()
    assert mask[0].all() and not mask[1:].all(dim=1).any()  # row 0 full, the others padded
    assert (ids[mask == 0] == c.pad_token_id).all() and (ids < c.vocab_size).all()
    again = meter_example_inputs(model, batch_size=4, seed=3)
    assert all(torch.equal(inputs[k], again[k]) for k in inputs)


# --- checkpoint conversion -------------------------------------------------------------------
OFFICIAL_KEYS = Path(__file__).parent / "data" / "meter_official_keys.txt"
"""METER's own state_dict layout, written from METER's source code (see the file's header), not from
:class:`MeterModel`: every key with its shape in terms of METER's config."""

TASK_LOSSES = {"vqa": ("vqa",), "nlvr2": ("nlvr2",), "snli_ve": ("snli",), "itm": ("itm", "irtr")}
"""The ``loss_names`` of METER's released fine-tuned checkpoint of each task (retrieval for ``itm``)."""


def meter_symbols(config: MeterConfig, **overrides: int) -> dict[str, int]:
    """The key list's symbols (METER's config, the CLIP and RoBERTa checkpoints it starts from)
    of the official model whose weights fit ``config``; ``overrides`` replace some (e.g. the
    checkpoint's own ``image_size``). CLIP's text width and context length (leftovers METER never
    uses) are small dummies."""
    assert config.cross_intermediate % config.hidden_size == 0, "METER's FFN is hidden_size * mlp_ratio"
    values = dict(
        hidden_size=config.hidden_size, num_top_layer=config.cross_layers,
        mlp_ratio=config.cross_intermediate // config.hidden_size, vocab_size=config.vocab_size,
        vqav2_label_size=config.num_labels if config.task == "vqa" else 3129, image_size=config.image_size,
        clip_width=config.vision_width, clip_layers=config.vision_layers + 1, clip_patch=config.patch_size,
        clip_text_width=8, clip_context_length=5, roberta_hidden=config.text_hidden,
        roberta_layers=config.text_layers, roberta_intermediate=config.text_intermediate,
        roberta_positions=config.text_max_positions, roberta_type_vocab=1,
    )
    values.update(overrides)
    return values


def _evaluate(expr: str, symbols: dict[str, int]) -> int:
    """An integer expression of the key list (+, -, *, //, parentheses, symbols)."""
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return symbols[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"{OFFICIAL_KEYS.name}: unsupported expression {expr!r}")

    return walk(ast.parse(expr.strip(), mode="eval").body)


def official_meter_keys(symbols: dict[str, int], losses: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official METER state dict for ``symbols`` and a run's ``loss_names``
    (those > 0), read from :data:`OFFICIAL_KEYS`."""
    losses = set(losses)
    symbols = {"token_types": 3 if "nlvr2" in losses else 2, **symbols}
    out: dict[str, tuple[int, ...]] = {}
    for line in OFFICIAL_KEYS.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape, group = line.split("\t")
        if group != "always" and group.removeprefix("loss:") not in losses:
            continue
        dims = tuple(_evaluate(d, symbols) for d in shape.split(",")) if shape else ()
        match = re.search(r"\{(\w+):([^}]+)\}", key)
        indices = range(_evaluate(match.group(2), symbols)) if match else [None]
        for i in indices:
            out[key if match is None else key[:match.start()] + str(i) + key[match.end():]] = dims
    return out


def official_meter_state_dict(symbols: dict[str, int], losses: Iterable[str], seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict laid out as METER's (:func:`official_meter_keys`), random values (``position_ids``:
    the buffer's arange)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.arange(shape[-1])[None] if k.endswith("position_ids") else torch.randn(shape, generator=gen))
            for k, shape in official_meter_keys(symbols, losses).items()}


def _official_layout(model: MeterModel, losses: Iterable[str] = ("vqa", "itm", "mlm"), seed: int = 0,
                     **symbols: int) -> dict[str, torch.Tensor]:
    """An official METER state dict that fits ``model``'s sizes: by default a VQA run that kept the
    pre-training heads (``itm_score``, ``mlm_score``)."""
    return official_meter_state_dict(meter_symbols(model.config, **symbols), losses, seed)


UNUSED_OFFICIAL = {  # in every official checkpoint, in no MeterModel
    "vit_model.positional_embedding", "vit_model.ln_final.weight", "vit_model.ln_final.bias",
    "text_transformer.pooler.dense.weight", "text_transformer.pooler.dense.bias",
    "text_transformer.embeddings.position_ids",
}


def test_official_key_list_is_read_as_written():
    keys = official_meter_keys(meter_symbols(METER_BASE, image_size=576), ["vqa"])  # the released VQAv2 model
    assert keys["vit_model.visual.positional_embedding"] == (36 * 36 + 1, 768)  # 576px / 16
    assert "vit_model.visual.transformer.resblocks.10.attn.in_proj_weight" in keys  # 11 blocks: CLIP's 12 - 1
    assert "vit_model.visual.transformer.resblocks.11.attn.in_proj_weight" not in keys
    assert keys["cross_modal_text_layers.5.intermediate.dense.weight"] == (3072, 768)
    assert keys["vqa_classifier.3.weight"] == (3129, 1536) and keys["token_type_embeddings.weight"] == (2, 768)
    assert not any(k.startswith(("mlm_score.", "itm_score.", "rank_output.", "nlvr2_classifier.")) for k in keys)
    nlvr2 = official_meter_keys(meter_symbols(METER_BASE), ["nlvr2"])
    assert nlvr2["token_type_embeddings.weight"] == (3, 768) and nlvr2["nlvr2_classifier.0.weight"] == (1536, 3072)


def test_convert_official_layout_and_load(tmp_path):
    target = _model("vqa", seed=1)
    sd = _official_layout(target)
    path = tmp_path / "meter.ckpt"
    torch.save({"state_dict": sd, "epoch": 9, "global_step": 100}, path)  # Lightning-style nesting

    conv = load_meter_checkpoint(path, target)
    assert set(conv.dropped) == UNUSED_OFFICIAL | {k for k in sd if k.startswith(("mlm_score.", "itm_score."))}
    assert "itm" in conv.dropped["itm_score.fc.weight"]
    assert not conv.missing and not conv.unexpected and not conv.mismatched and not conv.adapted
    loaded = target.state_dict()
    assert set(loaded) == {k.replace("vit_model.visual.", "vit_model.") for k in sd if k not in conv.dropped}
    for key, value in sd.items():
        if key not in conv.dropped:
            assert torch.equal(loaded[key.replace("vit_model.visual.", "vit_model.")], value), key


def test_convert_without_config_keeps_heads_and_is_idempotent():
    model = _model("vqa")
    converted = convert_meter_state_dict(_official_layout(model))
    assert "itm_score.fc.weight" in converted and "vqa_classifier.0.weight" in converted
    assert "vit_model.conv1.weight" in converted and not any(k.startswith("vit_model.visual.") for k in converted)
    assert convert_meter_state_dict(model.state_dict()).keys() == model.state_dict().keys()


def test_convert_interpolates_positions_and_token_types():
    model = _model("nlvr2")  # 64px / 16 = 4x4 grid, three token types
    sd = _official_layout(build_meter("tiny", image_size=32))  # 2x2 grid, VQA: two token types
    pos = torch.randn(5, 64)
    pos[1:] = 0.25  # a constant grid stays constant under bicubic interpolation
    sd["vit_model.visual.positional_embedding"] = pos
    conv = convert_meter_checkpoint(sd, model.config)
    new = conv.state_dict["vit_model.positional_embedding"]
    assert new.shape == (17, 64)
    torch.testing.assert_close(new[0], pos[0])
    torch.testing.assert_close(new[1:], torch.full((16, 64), 0.25))
    types = conv.state_dict["token_type_embeddings.weight"]
    assert types.shape == (3, 64) and torch.equal(types[2], types[1])
    assert set(conv.adapted) == {"vit_model.positional_embedding", "token_type_embeddings.weight"}
    assert "vqa_classifier.0.weight" in conv.dropped  # another task's head
    with pytest.raises(MeterCheckpointError, match="nlvr2_classifier"):  # the task head is missing
        load_meter_checkpoint(sd, model)
    report = load_meter_checkpoint(sd, model, strict=False)
    assert report.missing and all(k.startswith("nlvr2_classifier.") for k in report.missing)
    torch.testing.assert_close(model.vit_model.positional_embedding.data, new)


def test_load_errors_name_the_keys():
    model = _model("vqa")
    sd = _official_layout(model)
    del sd["cross_modal_text_pooler.dense.bias"]
    sd["cross_modal_extra.weight"] = torch.zeros(3)
    sd["cross_modal_image_transform.weight"] = torch.zeros(5, 5)
    before = model.cross_modal_image_pooler.dense.weight.clone()
    sd["cross_modal_image_pooler.dense.weight"] = torch.full_like(before, 4.0)
    with pytest.raises(MeterCheckpointError) as err:
        load_meter_checkpoint(sd, model)
    msg = str(err.value)
    assert "cross_modal_text_pooler.dense.bias" in msg and "missing" in msg
    assert "cross_modal_extra.weight" in msg and "unexpected" in msg
    assert "cross_modal_image_transform.weight" in msg and "(5, 5)" in msg
    assert torch.equal(model.cross_modal_image_pooler.dense.weight, before)  # strict: nothing loaded
    report = load_meter_checkpoint(sd, model, strict=False)
    assert report.missing == ["cross_modal_text_pooler.dense.bias"]
    assert report.unexpected == ["cross_modal_extra.weight"]
    assert set(report.mismatched) == {"cross_modal_image_transform.weight"}
    assert (model.cross_modal_image_pooler.dense.weight == 4.0).all()


def test_interpolation_rejects_non_square_grids():
    sd = {"vit_model.positional_embedding": torch.zeros(1 + 6, 64)}
    with pytest.raises(MeterCheckpointError, match="square"):
        convert_meter_checkpoint(sd, METER_TINY)


def test_unreadable_pickle_explains_how_to_extract(tmp_path):
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": argparse.Namespace(lr=1e-5)}, path)  # not weights-only
    with pytest.raises(MeterCheckpointError, match="weights_only"):
        load_meter_checkpoint(path, _model())


def test_multihead_attention_with_a_value_other_than_its_key_is_refused():
    """trimkit's recomputation of an nn.MultiheadAttention call projects its key for keys and values: a call
    with another value would be silently wrong, so it is refused by name; value = key is the context."""
    from trimkit.spec import multihead_attention

    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    spec = multihead_attention("attn", mha, kind="cross")
    q, k, v = torch.randn(1, 3, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    with pytest.raises(NotImplementedError, match="value different from its key"):
        spec.inputs((q, k, v), {})
    with pytest.raises(NotImplementedError, match="value different from its key"):
        spec.inputs((q,), {"key": k, "value": v})
    assert spec.inputs((q, k, k), {}).context is k
    assert spec.inputs((q, q, q), {}).context is None  # self-attention
