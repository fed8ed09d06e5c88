"""Paper-size MACs of a decoder VLM's prefill and of one decode step, full vs trimmed image tokens,
counted on the meta device (no weights, no memory): LLaVA-1.5-7B.

The model is transformers' own ``LlavaForConditionalGeneration`` built under ``torch.device("meta")``
from config objects (Vicuna-7B decoder: hidden 4096, 32 layers, 32 heads, intermediate 11008; CLIP
ViT-L/14 at 336px: 576 image tokens after the [CLS] crop, features of the second-to-last layer; a
2-layer GELU MLP projector; the vocabulary of ``llava-hf/llava-1.5-7b-hf``, 32064 = Vicuna's 32000 +
the image token + padding to a multiple of 64), wrapped by ``trimkit_llava.wrap``. ``count_macs``
(``FlopCounterMode``) then runs the model's own modules on meta tensors, so every count is measured
from the code that would run, not from a formula:

* prefill: the vision tower and projector (as ``LlavaForTrimming`` calls them), the embeddings with
  the image features scattered in, then decoder layer ``i`` on the rows it keeps: every token before
  layer ``K``, from layer ``K`` on the prompt, the question and a fraction of the image tokens (a
  dropped token stays dropped; FastV K=2 R=50% is "50% from layer 2"), at their original RoPE
  positions; final norm and ``lm_head`` on the last row (what transformers' ``generate`` computes,
  ``logits_to_keep=1``);
* one decode step: the model's own decoder layers on a ``DynamicCache`` whose layer ``i`` holds the
  keys its prefill computed (as ``trimkit_llava.generation.decode_step`` runs them), one new token.

Each count is also computed in closed form from the config (:func:`closed_form_prefill`,
:func:`closed_form_decode`: linear layers ``tokens x weights``, attention ``heads x queries x keys x
(2 x head dim)`` dense as ``count_macs`` counts it); the table shows both, and
``tests/test_profile_decoder.py`` checks that they agree on small configs and with the real tiny model's
measured prefill and decode steps.

Writes ``benchmarks/results/decoder_macs.md`` and the ``decoder_macs`` section of
``benchmarks/RESULTS.md`` (``--no-write``: print only).

    python benchmarks/decoder_macs.py [--prompt 35] [--question 29] [--keeps 0.5 0.25] [--layers 2 8] [--no-write]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Sequence

import torch

OUT = Path(__file__).resolve().parent / "results"

LLAVA_15_7B = {
    "vision_config": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          image_size=336, patch_size=14, projection_dim=768),
    "text_config": dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "image_token_id": 32000, "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    "projector_hidden_act": "gelu",
}
"""LLaVA-1.5-7B's shapes (``llava-hf/llava-1.5-7b-hf``'s config.json)."""


def build_meta(vision_config: dict, text_config: dict, **options: Any) -> torch.nn.Module:
    """``trimkit_llava.wrap(LlavaForConditionalGeneration(config))`` with every parameter on the meta device."""
    from trimkit._compat import ensure_torchvision

    ensure_torchvision()
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from trimkit_llava import wrap

    config = LlavaConfig(vision_config=CLIPVisionConfig(**vision_config).to_dict(),
                         text_config=LlamaConfig(**text_config).to_dict(), **options)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config).eval()
    return wrap(model)


def image_tokens(config: Any) -> int:
    v = config.vision_config
    return (v.image_size // v.patch_size) ** 2 + (0 if config.vision_feature_select_strategy == "default" else 1)


def layer_lengths(config: Any, prompt: int, question: int, keep: float = 1.0, from_layer: int = 0) -> list[int]:
    """Tokens each decoder layer computes: all before ``from_layer``, then prompt + question +
    ``round(keep * image tokens)``."""
    n_img = image_tokens(config)
    kept = prompt + question + round(keep * n_img)
    return [prompt + n_img + question if i < from_layer else kept
            for i in range(config.text_config.num_hidden_layers)]


def _kept_rows(prompt: int, n_img: int, question: int, length: int) -> torch.Tensor:
    """Row indices of a layer that keeps ``length`` tokens: the prompt, the first image tokens, the question."""
    k = length - prompt - question
    if not 0 <= k <= n_img:
        raise ValueError(f"decoder_macs: {length} tokens cannot hold the prompt ({prompt}) and question ({question})")
    return torch.cat([torch.arange(prompt + k), torch.arange(prompt + n_img, prompt + n_img + question)])


def prefill_macs(wrapper: torch.nn.Module, prompt: int, question: int, lengths: Sequence[int],
                 lm_head_rows: str = "last"):
    """``count_macs`` of the prefill with layer ``i`` computing ``lengths[i]`` tokens (non-increasing:
    a dropped image token stays dropped). ``lm_head_rows``: ``"last"`` (transformers' generate) or
    ``"all"`` (every row of the last layer, as ``LlavaForTrimming``'s forward). Works on meta or real
    weights (inputs follow the parameters' device)."""
    from trimkit.macs import count_macs

    cfg = wrapper.config
    n_img = image_tokens(cfg)
    N = prompt + n_img + question
    if any(b > a for a, b in zip([N, *lengths], lengths)) or len(lengths) != cfg.text_config.num_hidden_layers:
        raise ValueError(f"decoder_macs: lengths must be one non-increasing count per layer <= {N}, got {lengths}")
    dev = next(wrapper.parameters()).device
    ids = torch.full((1, N), 5, dtype=torch.long)
    ids[0, 0] = cfg.text_config.bos_token_id if cfg.text_config.bos_token_id is not None else 1
    ids[0, prompt:prompt + n_img] = cfg.image_token_id
    pixels = torch.zeros(1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
    llava = wrapper.model.model
    lm = llava.language_model

    def run():
        vision = llava.vision_tower(pixels.to(dev), output_hidden_states=True, return_dict=True)
        features = vision.hidden_states[wrapper.feature_layer]
        if wrapper.crop_cls:
            features = features[:, 1:]
        features = llava.multi_modal_projector(features)
        h = lm.embed_tokens(ids.to(dev))
        h = h.masked_scatter((ids.to(dev) == cfg.image_token_id)[..., None].expand_as(h), features.to(h.dtype))
        positions = torch.arange(N)
        for layer, n in zip(lm.layers, lengths):
            if n < h.shape[1]:  # keep the first rows of the image and the whole prompt and question
                keep = _kept_rows(prompt, n_img, question, n)
                rows = torch.searchsorted(positions, keep)
                h, positions = h[:, rows.to(dev)], keep
            pe = lm.rotary_emb(h, positions.to(dev)[None])
            h = layer(h, position_embeddings=pe)
        h = lm.norm(h if lm_head_rows == "all" else h[:, -1:])
        return wrapper.model.lm_head(h)

    return count_macs(run)


def decode_macs(wrapper: torch.nn.Module, cache_lengths: Sequence[int], position: int | None = None):
    """``count_macs`` of one decode step (batch 1) on a cache whose layer ``i`` holds
    ``cache_lengths[i]`` keys: the model's own decoder layers, as ``trimkit_llava.generation.decode_step``
    runs them (the new token at RoPE position ``position``, default the first layer's cache length)."""
    from transformers import DynamicCache

    from trimkit.macs import count_macs
    from trimkit_llava.generation import _cache_kwarg

    text = wrapper.config.text_config
    lm = wrapper.model.model.language_model
    dev = next(wrapper.parameters()).device
    p = next(lm.parameters())
    d = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv = text.num_key_value_heads
    cache = DynamicCache(ddp_cache_data=[(torch.zeros(1, kv, n, d, device=dev, dtype=p.dtype),
                                          torch.zeros(1, kv, n, d, device=dev, dtype=p.dtype)) for n in cache_lengths])
    name = _cache_kwarg(lm.layers[0].self_attn)
    pos = torch.tensor([[cache_lengths[0] if position is None else position]], device=dev)

    def run():
        h = lm.embed_tokens(torch.full((1, 1), 5, device=dev))
        pe = lm.rotary_emb(h, pos)
        for layer in lm.layers:
            h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe, use_cache=True,
                      **{name: cache})
        return wrapper.model.lm_head(lm.norm(h))[:, -1]

    return count_macs(run)


def _text_dims(text: Any) -> tuple[int, int, int, int, int, int, int]:
    D, H = text.hidden_size, text.num_attention_heads
    d = getattr(text, "head_dim", None) or D // H
    return D, H, text.num_key_value_heads, d, text.intermediate_size, text.vocab_size, text.num_hidden_layers


def _per_token_layer(text: Any) -> int:
    """MACs of one decoder layer's linears for one token: q, k, v, o projections + gated MLP."""
    D, H, Hkv, d, I, _, _ = _text_dims(text)
    return D * H * d + 2 * D * Hkv * d + H * d * D + 3 * D * I


def closed_form_vision(config: Any) -> int:
    """CLIP tower (every layer runs) + 2-layer projector on the image tokens."""
    v = config.vision_config
    P = (v.image_size // v.patch_size) ** 2
    Nv, Dv, Iv, Hv = P + 1, v.hidden_size, v.intermediate_size, v.num_attention_heads
    tower = P * 3 * v.patch_size ** 2 * Dv + v.num_hidden_layers * (Nv * (4 * Dv * Dv + 2 * Dv * Iv)
                                                                     + Hv * Nv * Nv * 2 * (Dv // Hv))
    D = config.text_config.hidden_size
    return tower + image_tokens(config) * (Dv * D + D * D)


def closed_form_prefill(config: Any, lengths: Sequence[int], lm_head_rows: int = 1) -> int:
    """Closed-form prefill MACs: vision + projector, layer ``i`` on ``lengths[i]`` tokens (linears +
    dense attention ``H x L x L x 2d``), ``lm_head`` on ``lm_head_rows`` rows."""
    D, H, _, d, _, V, _ = _text_dims(config.text_config)
    per = _per_token_layer(config.text_config)
    layers = sum(L * per + H * L * L * 2 * d for L in lengths)
    return closed_form_vision(config) + layers + lm_head_rows * D * V


def closed_form_decode(text: Any, cache_lengths: Sequence[int]) -> int:
    """Closed-form MACs of one decode step (one new token) on caches of ``cache_lengths[i]`` keys per
    layer: every layer's linears on one token, attention over ``L_i + 1`` keys, ``lm_head`` on one row."""
    D, H, _, d, _, V, n = _text_dims(text)
    if len(cache_lengths) != n:
        raise ValueError(f"closed_form_decode: {len(cache_lengths)} cache lengths for {n} layers")
    return n * _per_token_layer(text) + sum(H * (L + 1) * 2 * d for L in cache_lengths) + D * V


def kv_cache_bytes(text: Any, cache_lengths: Sequence[int], bytes_per_value: int = 2) -> int:
    D, H, Hkv, d, _, _, _ = _text_dims(text)
    return sum(2 * Hkv * d * L * bytes_per_value for L in cache_lengths)


def main(argv: Sequence[str] | None = None) -> int:
    import common

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", type=int, default=35, help="text tokens before the image, BOS included (default 35)")
    ap.add_argument("--question", type=int, default=29, help="text tokens after the image (default 29)")
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.25], help="image keep ratios")
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8],
                    help="first decoder layer with trimmed image tokens (2: FastV K=2; 8: trimkit_llava's default "
                         "trim_layers start for 32 layers)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.time()
    wrapper = build_meta(**LLAVA_15_7B)
    cfg = wrapper.config
    params = sum(p.numel() for p in wrapper.parameters())
    n_img = image_tokens(cfg)
    N = args.prompt + n_img + args.question
    settings = [("full", 1.0, 0)] + [(f"{k:.0%} image tokens from layer {K}", k, K)
                                     for K in args.layers for k in args.keeps]
    rows, full = [], None
    weights_step = closed_form_decode(cfg.text_config, [-1] * cfg.text_config.num_hidden_layers)  # no attention
    for label, keep, K in settings:
        lengths = layer_lengths(cfg, args.prompt, args.question, keep, K)
        pre = prefill_macs(wrapper, args.prompt, args.question, lengths)
        pre_cf = closed_form_prefill(cfg, lengths)
        dec = decode_macs(wrapper, lengths, position=N)
        dec_cf = closed_form_decode(cfg.text_config, lengths)
        kv = kv_cache_bytes(cfg.text_config, lengths)
        vision = sum(pre.by_module.get(m, 0) for m in (type(wrapper.model.model.vision_tower).__name__,
                                                         type(wrapper.model.model.multi_modal_projector).__name__))
        if full is None:
            full = (pre.total, dec.total, kv)
        rows.append([label, str(lengths[-1] - args.prompt - args.question), f"{pre.total / 1e9:.1f}",
                     f"{pre_cf / 1e9:.1f}" + ("" if pre_cf == pre.total else " (differs)"),
                     f"{vision / 1e9:.1f}", f"{full[0] / pre.total:.2f}x", f"{dec.total / 1e9:.3f}",
                     f"{dec_cf / 1e9:.3f}" + ("" if dec_cf == dec.total else " (differs)"),
                     f"{full[1] / dec.total:.3f}x", f"{kv / 2**20:.0f}", f"{full[2] / kv:.2f}x"])
    headers = ["setting", "image tokens in layers >= K", "prefill GMACs (meta, measured)", "prefill closed form",
               "of which vision + projector", "prefill full/trimmed", "decode-step GMACs (meta, measured)",
               "decode closed form", "decode full/trimmed", "KV cache MiB (fp16)", "KV full/trimmed"]
    body = "\n".join([
        "## LLaVA-1.5-7B: prefill and decode-step MACs, full vs trimmed image tokens (meta device)",
        "",
        f"Command: `{common.command()}`",
        f"Machine: {common.machine()}, transformers {__import__('transformers').__version__}. "
        f"Date: {common.now()}. Runtime: {time.time() - t0:.0f} s.",
        "",
        f"transformers' `LlavaForConditionalGeneration` built on the meta device from LLaVA-1.5-7B's config "
        f"({params / 1e9:.2f} B parameters, none allocated), counted by `trimkit.macs.count_macs` running the "
        f"model's own modules. Prompt: {args.prompt} text tokens (BOS included) + {n_img} image tokens + "
        f"{args.question} question tokens = {N}. Trimmed: layers before K compute all {N} tokens, layers K.. "
        "only the prompt, the question and the kept image tokens (a dropped token stays dropped; FastV K=2 "
        "R=50% is the 50%/layer 2 row). Prefill: vision tower (all 24 layers run) + projector + decoder "
        "layers + `lm_head` on the last row. Decode step: one new token through every decoder layer, "
        "reading the keys that layer's prefill cached (cache lengths = the prefill's per-layer token counts), "
        "+ `lm_head`. The closed-form columns are computed from the config alone "
        "(benchmarks/decoder_macs.py `closed_form_*`); \"(differs)\" would mark a disagreement. Attention is "
        "counted dense (no causal discount), norms/softmax/RoPE/elementwise ops are not counted. "
        "KV cache: keys + values of every layer at fp16.",
        "",
        common.table(headers, rows),
        "",
        "Reading: the prefill falls with the kept image tokens (the vision tower and projector, untrimmed, "
        f"are a fixed {rows[0][4]} GMACs); one decode step is dominated by the weights (its linears and "
        f"`lm_head`: {weights_step / 1e9:.3f} GMACs whatever the cache), so a shorter cache saves little decode "
        "compute; what it saves is the "
        "KV cache's size and the bytes each decode step reads (the KV columns), which is what bounds decode "
        "speed on memory-bound hardware. Note: `trimkit_llava.prefill` currently applies `lm_head` to every "
        f"row of the last layer (+{cfg.text_config.hidden_size * cfg.text_config.vocab_size * (N - 1) / 1e9:.1f} "
        "GMACs at full length) where transformers' generate uses the last row only.",
    ])
    print(body)
    if not args.no_write:
        OUT.mkdir(exist_ok=True)
        (OUT / "decoder_macs.md").write_text("# Decoder VLM MACs (paper size, meta device)\n\n" + body + "\n")
        common.write_section("decoder_macs", "\n".join([
            "## Decoder VLM (LLaVA-1.5-7B): prefill and decode-step MACs, full vs trimmed",
            "",
            f"Command: `{common.command()}` ({common.now()}); full table and method: "
            "[results/decoder_macs.md](results/decoder_macs.md). Counted on the meta device (no weights).",
            "",
            common.table([headers[0], headers[2], headers[5], headers[6], headers[8], headers[10]],
                         [[r[0], r[2], r[5], r[6], r[8], r[10]] for r in rows]),
        ]))
    return 0


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
