"""Greedy or sampled generation for a trimmed LLaVA with a KV cache that holds only the kept tokens.

Prefill runs the trimmed model (:class:`~trimkit.model.TrimmedModel` of
:class:`~trimkit_llava.modeling.LlavaForTrimming`) once per instance at batch 1 in mode
``remove``: dropped tokens are really not computed. While it runs, every decoder layer's own
attention module is handed a transformers ``DynamicCache`` (a forward pre-hook sets its ``cache``
argument, nothing is patched), so the module stores its keys and values after RoPE exactly as
transformers' cache does, and they are the keys and values of the tokens that layer computed:
every token in the layers before the first trimmed one, the kept ones from there on, each at its
original position. Layer ``i``'s cache is therefore as long as the tokens kept at its input.

Decode steps then run the model's own decoder layers (untrimmed: the new token is computed in
every layer with every head) on that cache: the new token ``t`` (0-based) of an instance whose
prompt has ``n`` real tokens gets the RoPE position ``n + t`` (the original length, not the kept
count), and reads in layer ``i`` only the keys cached there. In a batch the instances' caches are
padded per layer to the longest and the padding rows are masked per instance (an additive
``(B, 1, 1, keys)`` mask, one per layer; a layer where every instance kept as many needs none).

``mode="hard"`` runs the same prefill masked (every token computed, each layer's dropped keys
masked, the cache full length): the reference the removed cache must agree with.
``mode="off"`` is the untrimmed model (its generated tokens are transformers' own greedy ones).

Shared with ``trimkit_qwen2_vl`` (its wrapper defines the two things that differ): ``inputs``
(further per-instance model inputs, batch first, such as Qwen2-VL's ``image_grid_thw``), and the
wrapper's ``decode_position_offsets(input_ids, attention_mask, inputs)``: per instance the offset of
its decode positions (Qwen2-VL's multimodal RoPE delta: new token ``t`` is at ``n + t + delta``;
LLaVA has none, 0).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["KeptCache", "LlavaGeneration", "decode_step", "generate", "prefill", "right_align"]

_MODES = ("remove", "packed", "hard", "off")


@dataclass
class KeptCache:
    """The decoder's KV cache after a trimmed prefill, batched.

    ``cache``: a transformers ``DynamicCache``, layer ``i`` holding ``(B, kv heads, keys_i, head dim)``
    keys and values (after RoPE), each instance's rows first and zero padding after them;
    ``valid``: per layer a ``(B, keys_i)`` bool, which rows each instance may attend to (grows by one
    column per decode step); ``masked``: per layer whether any row is invalid (only those layers get
    an attention mask); ``lengths``: per instance and layer the keys cached at prefill (the tokens
    that layer computed; with ``mode="hard"`` the kept ones among the full-length rows);
    ``prompt_lengths``: per instance its real prompt length ``n`` (the first new token's position)."""

    cache: Any
    valid: list[torch.Tensor]
    masked: list[bool]
    lengths: list[list[int]]
    prompt_lengths: list[int]
    offsets: list[int] | None = None  # per instance added to its decode positions (M-RoPE deltas); None: 0

    def select(self, rows: torch.Tensor) -> None:
        """Keep the instances at ``rows`` (B',) of the batch, in that order, repeats allowed (beam search:
        each instance's cache repeated per beam, then reordered to the beams that continue)."""
        self.cache.reorder_cache(rows)
        self.valid = [v.index_select(0, rows.to(v.device)) for v in self.valid]
        idx = rows.tolist()
        self.prompt_lengths = [self.prompt_lengths[r] for r in idx]
        self.lengths = [self.lengths[r] for r in idx]
        if self.offsets is not None:
            self.offsets = [self.offsets[r] for r in idx]

    @property
    def stored(self) -> list[int]:
        """Rows stored per layer (the batch's longest instance, padding included; it grows by one per step)."""
        return [int(v.shape[1]) for v in self.valid]


@dataclass
class LlavaGeneration:
    """What :func:`generate` returns.

    ``tokens``: ``(B, T)`` the generated token ids (``T <= max_new_tokens``; after an instance's
    EOS its row holds ``pad_token_id``, and generation stops early when every row has ended, as
    transformers does); ``cache_lengths``: per instance and decoder layer the keys its prefill
    cached (= the tokens that layer computed: fewer in and after the trimmed layers);
    ``prompt_lengths``: per instance its real prompt length; ``prompt_starts``: per instance the
    column of its first real prompt token in the ``input_ids`` given (0, or its left padding);
    ``generated``: per instance its
    generated tokens up to and including its EOS (the rest of its row is padding); ``logits``:
    ``(B, T, V)`` the next-token logits each token was chosen from (only with ``return_logits=True``;
    after an instance's EOS, those of the padding it was fed)."""

    tokens: torch.Tensor
    cache_lengths: list[list[int]]
    prompt_lengths: list[int]
    generated: list[int]
    logits: torch.Tensor | None = None
    prompt_starts: list[int] | None = None

    def sequences(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Per instance its real prompt ids (from the ``input_ids`` given to :func:`generate`, left- or
        right-padded) followed by its generated ids (EOS included, padding not)."""
        starts = self.prompt_starts or [0] * len(self.prompt_lengths)
        return [torch.cat([input_ids[b, s:s + n], self.tokens[b, :g]])
                for b, (s, n, g) in enumerate(zip(starts, self.prompt_lengths, self.generated))]


def right_align(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """A left-padded batch (``padding_side="left"``, what transformers' batched generation uses) in the
    right-padded layout the trimmed prefill reads: each row's real tokens moved to its start, the
    padding after them. Returns ``(input_ids, attention_mask, starts)``, ``starts`` the column where
    each row's real tokens began. Nothing else changes: transformers numbers a left-padded row's
    positions from its first real token (position ids from the mask's running count), as a
    right-padded row's are numbered, so the generated tokens are the same. A row whose real tokens are
    not one contiguous run (padding inside the prompt) is left as it is, for the prefill to refuse."""
    if attention_mask is None or input_ids.dim() != 2 or tuple(attention_mask.shape) != tuple(input_ids.shape):
        return input_ids, attention_mask, [0] * (input_ids.shape[0] if input_ids.dim() else 0)
    real = attention_mask != 0
    N = real.shape[1]
    starts = torch.where(real.any(1), real.int().argmax(1), torch.zeros_like(real[:, 0], dtype=torch.long))
    lengths = real.sum(1)
    cols = torch.arange(N, device=real.device)[None]
    run = (cols >= starts[:, None]) & (cols < (starts + lengths)[:, None])
    shift = torch.where((run == real).all(1), starts, torch.zeros_like(starts))  # contiguous rows only
    if not bool(shift.any()):
        return input_ids, attention_mask, [0] * real.shape[0]
    take = (cols + shift[:, None]) % N  # row b's column j reads column j + shift_b: the real run first
    return (input_ids.gather(1, take.to(input_ids.device)), attention_mask.gather(1, take.to(attention_mask.device)),
            shift.tolist())


def _cache_kwarg(attention: nn.Module) -> str:
    """The name under which this transformers version's attention module takes its cache (5.24: ``cache``,
    earlier: ``past_key_values``)."""
    names = inspect.signature(inspect.unwrap(type(attention).forward)).parameters
    for name in ("cache", "past_key_values"):
        if name in names:
            return name
    raise NotImplementedError(f"trimkit_llava.generate: {type(attention).__name__}.forward takes no cache argument "
                              "('cache' or 'past_key_values'); this transformers version is not supported")


def _wrapper(tmodel: nn.Module) -> nn.Module:
    from trimkit.model import TrimmedModel

    from .modeling import LlavaForTrimming

    def known(wrapper: nn.Module) -> bool:  # LLaVA's, or one that declares its decode positions (Qwen2-VL's)
        return isinstance(wrapper, LlavaForTrimming) or callable(getattr(wrapper, "decode_position_offsets", None))

    if not isinstance(tmodel, TrimmedModel) or not known(tmodel.model):
        raise TypeError(f"trimkit_llava.generate: expected a trimmed LLaVA (trimkit.trim(trimkit_llava.wrap(model)), "
                        f"a TrimmedModel of LlavaForTrimming), got {type(tmodel).__name__}"
                        + (f" of {type(tmodel.model).__name__}" if isinstance(tmodel, TrimmedModel) else ""))
    if tmodel.training or tmodel.model.training:
        raise RuntimeError("trimkit_llava.generate: the model is in training mode (masks would be sampled); call "
                           "tmodel.eval() first")
    return tmodel.model


@contextlib.contextmanager
def _capture(layers: nn.ModuleList, cache: Any, mode: str, valid: dict[int, torch.Tensor],
             packs: dict[int, Any]) -> Iterator[None]:
    """Hand every decoder layer's attention module ``cache`` for the block (forward pre-hooks), and note
    which of its keys each layer's attention really reads (mode hard: its key mask; mode packed: the
    packing of its rows)."""
    name = _cache_kwarg(layers[0].self_attn)
    calls: dict[int, int] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        i = module.layer_idx
        if len(args) > 3 or kwargs.get(name) is not None:
            raise RuntimeError(f"trimkit_llava.generate: decoder layer {i}'s attention was called with a cache of its "
                               "own; the prefill must not use one")
        calls[i] = calls.get(i, 0) + 1
        if calls[i] > 1:
            raise RuntimeError(f"trimkit_llava.generate: decoder layer {i}'s attention ran twice in one prefill")
        trim = kwargs.get("trimkit_trim")
        packed = getattr(trim, "packed", None)
        if (mode == "packed") != (packed is not None):
            how = "packed" if packed is not None else "unpacked"
            raise RuntimeError(f"trimkit_llava.generate: decoder layer {i} ran {how} in a prefill of mode {mode!r}")
        if packed is not None:
            if packed.k.padded or packed.k.counts != packed.q.counts:
                raise RuntimeError(f"trimkit_llava.generate: decoder layer {i}'s keys are not its queries' packed rows")
            packs[i] = packed.k
        key_mask = getattr(trim, "key_mask", None)
        if mode == "remove" and key_mask is not None:
            raise RuntimeError(f"trimkit_llava.generate: decoder layer {i} ran masked in mode remove (its cache would "
                               "hold dropped tokens)")
        if key_mask is not None:
            valid[i] = key_mask[0] > 0
        return args, {**kwargs, name: cache}

    handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in range(len(layers)) if i not in calls]
    if missing:
        raise RuntimeError(f"trimkit_llava.generate: decoder layers {missing} never ran their attention in the prefill")


def _check_window(wrapper: nn.Module, total: int) -> None:
    """Sliding-window decoders (Mistral-based LLaVA) are decoded as full attention: refused once the
    sequence could outgrow the window."""
    window = getattr(wrapper.config.text_config, "sliding_window", None)
    if window is not None and total > int(window):
        raise NotImplementedError(f"trimkit_llava.generate: the decoder's sliding window ({window} tokens) is shorter "
                                  f"than prompt + new tokens ({total}); sliding-window caches are not supported")


def _check_inputs(input_ids: torch.Tensor, pixel_values: torch.Tensor,
                  attention_mask: torch.Tensor | None) -> list[int]:
    """Real prompt length per instance; refuses left padding and shapes that do not fit."""
    if input_ids.dim() != 2:
        raise ValueError(f"trimkit_llava.generate: input_ids must be (batch, length), got {tuple(input_ids.shape)}")
    B, N = input_ids.shape
    if pixel_values.shape[0] != B:
        raise ValueError(f"trimkit_llava.generate: {pixel_values.shape[0]} images for {B} prompts (one image per "
                         "instance is supported)")
    if attention_mask is None:
        return [N] * B
    if tuple(attention_mask.shape) != (B, N):
        raise ValueError(f"trimkit_llava.generate: attention_mask {tuple(attention_mask.shape)} does not match "
                         f"input_ids {(B, N)}")
    real = attention_mask != 0
    lengths = real.sum(1)
    prefix = torch.arange(N, device=real.device)[None] < lengths[:, None]
    bad = (real != prefix).any(1)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten().tolist()
        raise ValueError(f"trimkit_llava: rows {rows} of attention_mask are not right-padded (a 0 before a 1): "
                         "left padding is not supported by the prefill; pad on the right "
                         "(tokenizer.padding_side = 'right'), or call generate(), which right-aligns left-padded "
                         "rows (padding inside a prompt is refused there too)")
    lengths = lengths.tolist()
    if min(lengths) == 0:
        raise ValueError(f"trimkit_llava.generate: rows {[b for b, n in enumerate(lengths) if n == 0]} have no real "
                         "token")
    return lengths


def _prefill_rows(tmodel: nn.Module, wrapper: nn.Module, ids: torch.Tensor, pixels: torch.Tensor,
                  mask: torch.Tensor, mode: str, inputs: dict[str, Any]) -> tuple[list[torch.Tensor], list[list[tuple]]]:
    """One forward of ``tmodel`` in ``mode`` with every layer's cache captured: per instance its
    next-token logits (V,) and per layer (keys (1, Hkv, n, d), values, valid rows (n,) or None)."""
    from transformers import DynamicCache

    from .modeling import llava_segment_starts

    lm = wrapper.model.model.language_model
    cache = DynamicCache()
    valid: dict[int, torch.Tensor] = {}
    packs: dict[int, Any] = {}
    x = {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask,
         "segment_starts": llava_segment_starts(ids, wrapper.image_token_id), **inputs}
    # exact kept counts: bucketed (compiled) execution would put its slack rows into the cache
    with _capture(lm.layers, cache, mode, valid, packs), tmodel.mode(mode), tmodel.eager():
        out = tmodel(**x)
    n_layers = len(lm.layers)
    if mode == "packed":  # rows of the whole batch: each instance's kept rows, in order, at offsets[b]
        last_pack = packs[n_layers - 1]
        logits = [out[b, last_pack.counts[b] - 1] for b in range(ids.shape[0])]  # its question's last token
        per = [[(cache.layers[i].keys[:, :, packs[i].offsets[b]:packs[i].offsets[b + 1]],
                 cache.layers[i].values[:, :, packs[i].offsets[b]:packs[i].offsets[b + 1]], None)
                for i in range(n_layers)] for b in range(ids.shape[0])]
    else:  # batch 1, no padding: the last row is the question's last token (always kept)
        if cache.layers[n_layers - 1].keys.shape[-2] != out.shape[1]:
            raise RuntimeError(f"trimkit_llava.generate: the last decoder layer cached "
                               f"{cache.layers[-1].keys.shape[-2]} keys but the model returned {out.shape[1]} rows")
        logits = [out[0, -1]]
        per = [[(cache.layers[i].keys, cache.layers[i].values, valid.get(i)) for i in range(n_layers)]]
    if wrapper.output == "hidden":
        logits = [wrapper.model.lm_head(h) for h in logits]
    return logits, per


def prefill(tmodel: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor,
            attention_mask: torch.Tensor | None = None, mode: str = "remove",
            inputs: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, KeptCache]:
    """Run the trimmed prefill and return ``(next-token logits (B, V), KeptCache)``. ``mode``:
    ``"remove"`` (each instance alone at batch 1, its real tokens only; dropped tokens not
    computed, the cache holds only kept tokens), ``"packed"`` (the same decisions and cache, the
    whole batch in one forward of mode packed: the kept tokens of every instance in one row
    matrix), ``"hard"`` (masked, each instance alone: full-length cache, dropped keys invalid) or
    ``"off"`` (the untrimmed model, each instance alone). Right padding only. ``inputs``: further
    model inputs, one row per instance (module docstring)."""
    from transformers import DynamicCache

    if mode not in _MODES:
        raise ValueError(f"trimkit_llava.prefill: mode must be one of {_MODES}, got {mode!r}")
    wrapper = _wrapper(tmodel)
    lengths = _check_inputs(input_ids, pixel_values, attention_mask)
    inputs = dict(inputs or {})
    for name, value in inputs.items():
        if not isinstance(value, torch.Tensor) or value.shape[0] != input_ids.shape[0]:
            raise ValueError(f"trimkit_llava.prefill: inputs[{name!r}] must be a tensor with one row per instance "
                             f"({input_ids.shape[0]})")
    _check_window(wrapper, max(lengths))
    offsets = None
    if callable(getattr(wrapper, "decode_position_offsets", None)):
        offsets = [int(o) for o in wrapper.decode_position_offsets(input_ids, attention_mask, inputs)]
    if mode == "packed":
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        logits, per = _prefill_rows(tmodel, wrapper, input_ids[:, :max(lengths)], pixel_values,
                                    mask[:, :max(lengths)], mode, inputs)
    else:
        logits, per = [], []
        for b, n in enumerate(lengths):
            ids = input_ids[b:b + 1, :n]
            one, layers = _prefill_rows(tmodel, wrapper, ids, pixel_values[b:b + 1], torch.ones_like(ids), mode,
                                        {k: v[b:b + 1] for k, v in inputs.items()})
            logits += one
            per += layers
    data, valid, masked = [], [], []
    counts = [[0] * len(per[0]) for _ in per]
    for i in range(len(per[0])):
        rows = [p[i][0].shape[-2] for p in per]
        L = max(rows)
        keys = per[0][i][0].new_zeros(len(per), *per[0][i][0].shape[1:-2], L, per[0][i][0].shape[-1])
        values = per[0][i][1].new_zeros(len(per), *per[0][i][1].shape[1:-2], L, per[0][i][1].shape[-1])
        ok = torch.zeros(len(per), L, dtype=torch.bool, device=keys.device)
        for b, (k, v, own) in enumerate(p[i] for p in per):
            keys[b, ..., :k.shape[-2], :] = k[0]
            values[b, ..., :v.shape[-2], :] = v[0]
            ok[b, :k.shape[-2]] = True if own is None else own.to(ok.device)
            counts[b][i] = int(k.shape[-2]) if own is None else int(own.sum())
        data.append((keys, values))
        valid.append(ok)
        masked.append(not bool(ok.all()))
    kept = KeptCache(DynamicCache(ddp_cache_data=data), valid, masked, counts, lengths, offsets)
    return torch.stack(logits), kept


def decode_step(tmodel: nn.Module, kept: KeptCache, tokens: torch.Tensor, step: int) -> torch.Tensor:
    """One untrimmed decode step: ``tokens`` (B,) the latest token of each instance, ``step`` its
    index among the generated tokens (0 for the first), so instance ``b`` is at position
    ``prompt_lengths[b] + step`` (plus ``kept.offsets[b]``, the M-RoPE delta, where there is one). Appends its keys and values to every layer of ``kept.cache`` and
    returns the next-token logits (B, V)."""
    wrapper = _wrapper(tmodel)
    llava = wrapper.model
    lm = llava.model.language_model
    name = _cache_kwarg(lm.layers[0].self_attn)
    B = tokens.shape[0]
    start = kept.prompt_lengths if kept.offsets is None else [n + o for n, o in zip(kept.prompt_lengths, kept.offsets)]
    positions = torch.tensor(start, device=tokens.device)[:, None] + step
    h = lm.embed_tokens(tokens[:, None])
    pe = lm.rotary_emb(h, positions)
    new = torch.ones(B, 1, dtype=torch.bool, device=tokens.device)
    for i, layer in enumerate(lm.layers):
        kept.valid[i] = torch.cat([kept.valid[i], new.to(kept.valid[i].device)], 1)
        mask = None
        if kept.masked[i]:  # additive, as every transformers attention function (eager too) takes it
            mask = torch.zeros(kept.valid[i].shape, dtype=h.dtype, device=h.device).masked_fill(
                ~kept.valid[i].to(h.device), torch.finfo(h.dtype).min)[:, None, None, :]
        h = layer(h, attention_mask=mask, position_ids=positions, position_embeddings=pe, use_cache=True,
                  **{name: kept.cache})
    return llava.lm_head(lm.norm(h))[:, -1]


def _warpers(gen_cfg, temperature: float | None, top_k: int | None, top_p: float | None):
    """transformers' sampling warpers, in the order its ``generate`` applies them; unset values from
    ``gen_cfg`` (a ``GenerationConfig``), else transformers' defaults."""
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    def pick(value, name, default):
        if value is not None:
            return value
        got = getattr(gen_cfg, name, None)
        return default if got is None else got

    temperature, top_k, top_p = pick(temperature, "temperature", 1.0), pick(top_k, "top_k", 50), pick(top_p, "top_p", 1.0)
    if not float(temperature) > 0:
        raise ValueError(f"trimkit_llava.generate: temperature must be > 0 for sampling, got {temperature}")
    if int(top_k) < 0 or not 0 < float(top_p) <= 1:
        raise ValueError(f"trimkit_llava.generate: need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
    warpers = LogitsProcessorList()
    if float(temperature) != 1.0:
        warpers.append(TemperatureLogitsWarper(float(temperature)))
    if int(top_k) != 0:
        warpers.append(TopKLogitsWarper(int(top_k)))
    if float(top_p) < 1.0:
        warpers.append(TopPLogitsWarper(float(top_p)))
    return warpers


def _beam_search(tmodel: nn.Module, hf: nn.Module, logits: torch.Tensor, kept: KeptCache, max_new_tokens: int,
                 num_beams: int, eos: list[int], pad_token_id: int, length_penalty: float,
                 early_stopping: bool | str) -> tuple[torch.Tensor, list[int]]:
    """Beam search over a kept-token cache, with transformers' own beam-search steps (the
    ``GenerationMixin`` helpers its ``generate(num_beams=k)`` runs: top-k continuations, running and
    finished beams, length penalty, early-stopping heuristic), on generated tokens only (its
    ``decoder_prompt_len`` = 0: every rule there counts generated tokens, so per-instance prompt
    lengths need no common padded length). ``logits``: (B, V) prefill next-token logits; the cache is
    repeated per beam and reordered to the continuing beams after every step. Returns the best beam's
    tokens (B, T) and its generated length per instance."""
    steps = ("_get_top_k_continuations", "_get_running_beams_for_next_iteration", "_update_finished_beams",
             "_check_early_stop_heuristic", "_beam_search_has_unfinished_sequences")
    if not all(callable(getattr(hf, s, None)) for s in steps):
        import transformers

        raise NotImplementedError(f"trimkit_llava.generate: num_beams > 1 runs transformers' beam-search steps "
                                  f"({', '.join(steps)}), which transformers {transformers.__version__} does not have "
                                  "(they came with its 4.50 beam-search rewrite); use greedy or sampled decoding")
    B, V = logits.shape
    k, T, dev = num_beams, max_new_tokens, logits.device
    kept.select(torch.arange(B, device=dev).repeat_interleave(k))
    logits = logits.repeat_interleave(k, 0)
    eos_t = torch.tensor(eos, dtype=torch.long, device=dev)
    keep = max(2, 1 + len(eos)) * k
    top_mask = torch.cat([torch.ones(k, dtype=torch.bool), torch.zeros(keep - k, dtype=torch.bool)]).to(dev)
    running = torch.full((B, k, T), pad_token_id, dtype=torch.long, device=dev)
    finished = running.clone()
    running_scores = torch.zeros(B, k, device=dev)
    running_scores[:, 1:] = -1e9  # only the first beam continues at step 0 (the beams are identical)
    scores = torch.full((B, k), -1e9, device=dev)
    ended = torch.zeros(B, k, dtype=torch.bool, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    running_idx = torch.full((B, k, T), -1, dtype=torch.int32, device=dev)
    finished_idx = running_idx.clone()
    cur = 0
    while True:
        log_probs = torch.log_softmax(logits.float(), dim=-1).view(B, k, V) + running_scores[:, :, None]
        top_lp, top_seq, top_idx = hf._get_top_k_continuations(
            accumulated_log_probs=log_probs.reshape(B, k * V), running_sequences=running, running_beam_indices=running_idx,
            cur_len=cur, decoder_prompt_len=0, do_sample=False, beams_to_keep=keep, num_beams=k, batch_size=B)
        hits = torch.isin(top_seq[:, :, cur], eos_t) | (cur + 1 >= T)  # transformers' EOS and max-length criteria
        running, running_scores, running_idx = hf._get_running_beams_for_next_iteration(
            topk_log_probs=top_lp, topk_running_sequences=top_seq, topk_running_beam_indices=top_idx,
            next_token_hits_stopping_criteria=hits, num_beams=k)
        finished, scores, finished_idx, ended = hf._update_finished_beams(
            sequences=finished, topk_running_sequences=top_seq, beam_scores=scores, topk_log_probs=top_lp,
            beam_indices=finished_idx, topk_running_beam_indices=top_idx, is_early_stop_heuristic_unsatisfied=improvable,
            is_sent_finished=ended, next_token_hits_stopping_criteria=hits, top_num_beam_mask=top_mask, num_beams=k,
            cur_len=cur, decoder_prompt_len=0, length_penalty=length_penalty, early_stopping=early_stopping)
        rows = running_idx[..., cur].reshape(-1).long()  # the flat cache row each continuing beam extends
        cur += 1
        improvable = hf._check_early_stop_heuristic(
            is_early_stop_heuristic_unsatisfied=improvable, running_beam_scores=running_scores, beam_scores=scores,
            is_sent_finished=ended, cur_len=cur, max_length=T, decoder_prompt_len=0, early_stopping=early_stopping,
            length_penalty=length_penalty)
        if not bool(hf._beam_search_has_unfinished_sequences(improvable, ended, hits, early_stopping)):
            break
        kept.select(rows)
        logits = decode_step(tmodel, kept, running[:, :, cur - 1].reshape(-1), cur - 1)
    lengths = ((finished_idx[:, 0] + 1) != 0).sum(1)
    best = finished[:, 0, :int(lengths.max())].clone()
    best[torch.arange(best.shape[1], device=dev)[None] >= lengths[:, None]] = pad_token_id
    return best, lengths.tolist()


def generate(tmodel: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor,
             attention_mask: torch.Tensor | None = None, max_new_tokens: int = 20, *,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None, mode: str = "remove",
             return_logits: bool = False, inputs: dict[str, torch.Tensor] | None = None, do_sample: bool = False,
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None, num_beams: int = 1, length_penalty: float | None = None,
             early_stopping: bool | str | None = None) -> LlavaGeneration:
    """Greedy or sampled generation from a trimmed LLaVA whose KV cache holds only the kept tokens
    (module docstring).

    ``tmodel``: ``trimkit.trim(trimkit_llava.wrap(model), config)`` in eval mode. ``input_ids``
    ``(B, N)`` with one contiguous run of image tokens per row, ``pixel_values`` ``(B, 3, H, W)``,
    ``attention_mask`` ``(B, N)``: padding on the right or on the left (a left-padded batch is
    prefilled in the right-padded layout, :func:`right_align`: the same positions, the same tokens;
    padding inside a prompt raises a ``ValueError``). ``mode``: ``"remove"`` (default: each instance prefilled alone at batch 1,
    with its own kept counts), ``"packed"`` (the batch prefilled in one packed forward, the same
    caches), ``"hard"`` (masked, the reference) or ``"off"`` (untrimmed); see :func:`prefill`.
    Decoding is batched either way. ``eos_token_id`` / ``pad_token_id``: default the model's
    ``generation_config``'s (else its text config's); ``eos_token_id=[]``: never stop before
    ``max_new_tokens``. ``inputs``: further model inputs, one row per instance (Qwen2-VL's
    ``image_grid_thw``; see the module docstring). Returns a :class:`LlavaGeneration` (the new tokens and the cache length of
    every layer).

    ``do_sample=True``: multinomial sampling as transformers' ``generate(do_sample=True)`` does it,
    with its own logits warpers in its order (temperature, top-k, top-p); ``temperature``/``top_k``/
    ``top_p`` default to the model's ``generation_config`` (transformers' defaults: 1.0, 50, 1.0).
    ``generator``: the random source (default the global one, as transformers uses, so under the same
    ``torch.manual_seed`` an untrimmed model samples transformers' own tokens). ``logits`` are the raw
    next-token logits either way.

    ``num_beams > 1``: beam search with transformers' own beam-search steps (:func:`_beam_search`; the
    result is its ``generate(num_beams=k)``'s best beam), the prefill's kept-token cache repeated per
    beam; ``length_penalty`` / ``early_stopping`` default to the model's ``generation_config``
    (transformers' defaults: 1.0, False). Not with ``do_sample`` (beam sampling) or ``return_logits``."""
    if int(max_new_tokens) < 1:
        raise ValueError(f"trimkit_llava.generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if int(num_beams) < 1:
        raise ValueError(f"trimkit_llava.generate: num_beams must be >= 1, got {num_beams}")
    if int(num_beams) > 1 and (do_sample or return_logits):
        raise ValueError("trimkit_llava.generate: num_beams > 1 is beam search; beam sampling (do_sample=True) and "
                         "return_logits are not supported with it")
    if int(num_beams) == 1 and (length_penalty is not None or early_stopping is not None):
        raise ValueError("trimkit_llava.generate: length_penalty and early_stopping apply to beam search; pass "
                         "num_beams > 1")
    wrapper = _wrapper(tmodel)
    gen_cfg = getattr(wrapper.model, "generation_config", None)
    if not do_sample and any(v is not None for v in (temperature, top_k, top_p, generator)):
        raise ValueError("trimkit_llava.generate: temperature, top_k, top_p and generator apply to sampling; "
                         "pass do_sample=True (greedy decoding ignores them)")
    warp = _warpers(gen_cfg, temperature, top_k, top_p) if do_sample else None
    text = wrapper.config.text_config
    if eos_token_id is None:
        eos_token_id = getattr(gen_cfg, "eos_token_id", None)
        eos_token_id = text.eos_token_id if eos_token_id is None else eos_token_id
    eos = [] if eos_token_id is None else [int(e) for e in (eos_token_id if isinstance(eos_token_id, (list, tuple))
                                                             else [eos_token_id])]
    if pad_token_id is None:
        pad_token_id = getattr(gen_cfg, "pad_token_id", None)
        pad_token_id = text.pad_token_id if pad_token_id is None else pad_token_id
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    input_ids, attention_mask, starts = right_align(input_ids, attention_mask)
    _check_window(wrapper, int(max_new_tokens) + (int(attention_mask.ne(0).sum(1).max()) if attention_mask is not None
                                                  else input_ids.shape[-1]))
    with torch.no_grad():
        logits, kept = prefill(tmodel, input_ids, pixel_values, attention_mask, mode, inputs)
        if int(num_beams) > 1:
            lp = length_penalty if length_penalty is not None else getattr(gen_cfg, "length_penalty", None)
            es = early_stopping if early_stopping is not None else getattr(gen_cfg, "early_stopping", None)
            cache_lengths, prompt_lengths = kept.lengths, kept.prompt_lengths
            out, generated = _beam_search(tmodel, wrapper.model, logits, kept, int(max_new_tokens), int(num_beams), eos,
                                          int(pad_token_id), 1.0 if lp is None else float(lp),
                                          False if es is None else es)
            return LlavaGeneration(out, cache_lengths, prompt_lengths, generated, None, starts)
        eos_t = torch.tensor(eos, dtype=torch.long, device=input_ids.device)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        tokens, scores = [], []
        for t in range(int(max_new_tokens)):
            if t:
                logits = decode_step(tmodel, kept, tokens[-1], t - 1)
            scores.append(logits)
            if warp is None:
                choice = logits.argmax(-1)
            else:
                probs = torch.softmax(warp(input_ids, logits.float()), dim=-1)
                choice = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
            token = torch.where(done, torch.full_like(done, int(pad_token_id), dtype=torch.long), choice)
            tokens.append(token)
            if eos:
                done = done | torch.isin(token, eos_t)
                if bool(done.all()):
                    break
    out = torch.stack(tokens, 1)
    ends = torch.isin(out, eos_t) if eos else torch.zeros_like(out, dtype=torch.bool)
    generated = [int(row.nonzero()[0]) + 1 if bool(row.any()) else out.shape[1] for row in ends]
    return LlavaGeneration(out, kept.lengths, kept.prompt_lengths, generated,
                           torch.stack(scores, 1) if return_logits else None, starts)
