"""Generation through a trimmed BLIP: captions and free-form VQA answers.

A trimmed forward is one traced graph; generation is a loop. :func:`generate` splits the two:

1. one forward of the *trimmed* model computes the encoder side (the vision encoder for
   captioning; vision encoder + question encoder for VQA), with tokens and heads trimmed as in
   any other forward. A forward hook on the wrapper's marker module (``image_states`` /
   ``question_states``, an ``nn.Identity``) captures the encoder's output exactly as the trimmed
   graph produced it, and :meth:`trimkit.TrimmedModel.kept_mask` says which of its positions are
   kept tokens;
2. the BLIP decoder (``text_decoder``, untouched) then generates with transformers' ``generate``
   (KV cache, greedy/sampling/beam options), its cross-attention reading only those kept tokens:
   at batch 1 (mode ``remove``) the encoder output holds nothing else; in batches (modes ``hard``
   and ``packed``) the dropped or padding positions are masked out of every cross-attention.

transformers' BLIP text attention never applies ``encoder_attention_mask`` (its cross-attention
reads an argument nobody sets), so the mask is handed to each decoder cross-attention module by a
forward pre-hook for the duration of the call; nothing is left installed afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["generate", "encoder_states", "cross_attention_mask", "cross_attention_pre_hook", "unwrapped"]


@contextlib.contextmanager
def _capture(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    box: dict[str, torch.Tensor] = {}
    handle = module.register_forward_hook(lambda m, args, out: box.__setitem__("out", out))
    try:
        yield box
    finally:
        handle.remove()


@contextlib.contextmanager
def cross_attention_mask(decoder: nn.Module, keep: torch.Tensor | None) -> Iterator[None]:
    """Make every cross-attention of a BLIP text decoder ignore encoder positions where ``keep``
    ``(B, N)`` is False (batches of ``B * k`` decoder rows, e.g. beams, repeat each row's mask)."""
    if keep is None or bool(keep.all()):
        yield
        return
    dtype = next(decoder.parameters()).dtype
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)
    bias = bias[:, None, None, :]

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0] if args else kwargs["hidden_states"]
        rows = hidden.shape[0]
        if rows % bias.shape[0]:
            raise RuntimeError(f"trimkit_blip: decoder batch {rows} is not a multiple of the encoder batch {bias.shape[0]}")
        kwargs["encoder_attention_mask"] = bias.repeat_interleave(rows // bias.shape[0], 0)
        return args, kwargs

    with cross_attention_pre_hook(decoder, hook):
        yield


@contextlib.contextmanager
def cross_attention_pre_hook(decoder: nn.Module, hook: Any) -> Iterator[None]:
    """Install ``hook`` (a kwargs forward pre-hook) on every cross-attention module
    (``crossattention.self``) of a BLIP text decoder for the duration of the block."""
    handles = [layer.crossattention.self.register_forward_pre_hook(hook, with_kwargs=True)
               for layer in decoder.bert.encoder.layer if hasattr(layer, "crossattention")]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def unwrapped(model: nn.Module) -> nn.Module:
    """The BLIP wrapper a :class:`trimkit.TrimmedModel` trims (``model.model``), or ``model`` itself."""
    from trimkit import TrimmedModel

    return model.model if isinstance(model, TrimmedModel) else model


@contextlib.contextmanager
def _masked_batches(tmodel: nn.Module, batch: int) -> Iterator[None]:
    """Batches of a model set to ``inference = "packed"`` / ``"padded"`` run masked here instead: the
    forward includes BLIP's causal decoder, whose bias the packed engine does not take (the same
    decisions and outputs; the encoder side is not packed). Batch 1 is unaffected (tokens removed)."""
    import warnings

    from trimkit import TrimmedModel

    if not isinstance(tmodel, TrimmedModel) or batch == 1 or tmodel.inference not in ("packed", "padded"):
        yield
        return
    before = tmodel.inference
    tmodel.inference = "remove"  # larger batches masked, as mode hard
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="trimkit: an eval-mode batch")
            yield
    finally:
        tmodel.inference = before


def _bos(batch: int, bos: int, device: torch.device) -> torch.Tensor:
    return torch.full((batch, 1), bos, dtype=torch.long, device=device)


@torch.no_grad()
def encoder_states(tmodel: Any, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the trimmed encoder side once: ``(states (B, N', D), keep (B, N') bool)``.
    ``tmodel``: a :class:`trimkit.TrimmedModel` of a captioning / VQA wrapper, or the wrapper itself
    (untrimmed: every image token kept, the question's padding not).

    Captioning: the image tokens the decoder reads (``input_ids`` is the caption prompt, BOS
    first). VQA: the question tokens (``input_ids``/``attention_mask`` the question). ``N'`` is
    the number of kept tokens at batch 1 and the full or padded length in batches (``keep`` says
    which are real)."""
    from .modeling import BlipCaptionForTrimming, BlipVQAForTrimming

    wrapper = unwrapped(tmodel)
    bos = wrapper.config.text_config.bos_token_id
    batch = pixel_values.shape[0]
    if isinstance(wrapper, BlipCaptionForTrimming):
        if input_ids is None:
            input_ids = _bos(batch, bos, pixel_values.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        marker, stream = wrapper.image_states, "vision"
        inputs = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
    elif isinstance(wrapper, BlipVQAForTrimming):
        if input_ids is None:
            raise ValueError("trimkit_blip.generate: VQA needs the question's input_ids")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        answer = _bos(batch, bos, pixel_values.device)
        marker, stream = wrapper.question_states, "text"
        inputs = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask,
                  "answer_ids": answer, "answer_attention_mask": torch.ones_like(answer)}
    else:
        raise TypeError(f"trimkit_blip.generate: {type(wrapper).__name__} does not generate (captioning and VQA do)")
    with _capture(marker) as box, _masked_batches(tmodel, batch):
        tmodel(**inputs)
    states = box["out"]
    keep = tmodel.kept_mask(stream) if tmodel is not wrapper else None
    if keep is None:
        keep = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        if stream == "text":
            keep &= attention_mask.bool()
    if keep.shape != states.shape[:2]:
        raise RuntimeError(f"trimkit_blip: kept-token mask {tuple(keep.shape)} does not match the encoder output "
                           f"{tuple(states.shape[:2])}")
    return states, keep


@torch.no_grad()
def generate(tmodel: Any, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None, **generate_kwargs: Any) -> torch.Tensor:
    """Generate captions (captioning wrapper) or answers (VQA wrapper) through a trimmed BLIP.

    ``tmodel`` is :func:`trimkit.trim` of a :class:`~trimkit_blip.BlipCaptionForTrimming` or
    :class:`~trimkit_blip.BlipVQAForTrimming`; inside ``with tmodel.full():`` nothing is trimmed
    (the wrapper itself, untrimmed, works too).
    Captioning: ``input_ids`` is the prompt (BOS first, no trailing [SEP]; default BOS alone), and
    the result starts with it. VQA: ``input_ids``/``attention_mask`` are the question and the
    result is the answer, starting with BOS. ``generate_kwargs`` go to transformers' ``generate``
    (``max_new_tokens``, ``num_beams``, ``do_sample``...). Runs in eval mode: batch 1 with the dropped
    tokens removed, larger batches masked (``tmodel.inference = "packed"`` is not available for BLIP's
    decoders yet: the packed engine has no causal self-attention, so batches of a model set to it run
    masked here)."""
    from .modeling import BlipCaptionForTrimming

    wrapper = unwrapped(tmodel)
    if tmodel.training:
        raise RuntimeError("trimkit_blip.generate: call tmodel.eval() first (training mode samples random masks)")
    text = wrapper.config.text_config
    states, keep = encoder_states(tmodel, pixel_values, input_ids, attention_mask)
    if isinstance(wrapper, BlipCaptionForTrimming):
        prompt = input_ids if input_ids is not None else _bos(pixel_values.shape[0], text.bos_token_id, states.device)
        prompt_mask = attention_mask if attention_mask is not None else torch.ones_like(prompt)
    else:
        prompt = _bos(pixel_values.shape[0], text.bos_token_id, states.device)
        prompt_mask = torch.ones_like(prompt)
    decoder = wrapper.text_decoder
    with cross_attention_mask(decoder, keep):
        return decoder.generate(input_ids=prompt, attention_mask=prompt_mask, encoder_hidden_states=states,
                                eos_token_id=text.sep_token_id, pad_token_id=text.pad_token_id, **generate_kwargs)
