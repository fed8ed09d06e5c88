"""Measurements behind the paper's analysis figures, for any model trimkit describes.

* :func:`similarity_profile` (Fig. 2, Appendix A): per described layer, the mean pairwise cosine
  similarity of its output tokens, and per attention module the mean pairwise cosine similarity of
  its heads' attention distributions, one value per instance (padding excluded). Attention maps
  are formed from the queries, keys and mask of each ``F.scaled_dot_product_attention`` call the
  module makes (the call itself runs unchanged), so the model need not return attention weights.
* :func:`head_retention` (Fig. 6): per head trimmer, each instance's kept fraction of heads.
* :func:`vision_keep_masks` (Fig. 5): per token trimmer of a stream, each instance's keep mask.

All run the model in eval mode without gradients and change nothing in it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["attention_recorder", "head_retention", "head_similarity", "similarity_profile", "token_similarity",
           "vision_keep_masks"]


def token_similarity(x: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
    """Appendix A's S_T per instance: the mean cosine similarity over pairs of distinct tokens.

    ``x`` (B, N, D); ``real`` (B, N) bool, the tokens that count (default all). Returns (B,);
    NaN for an instance with fewer than two real tokens."""
    B, N, _ = x.shape
    real = torch.ones(B, N, dtype=torch.bool, device=x.device) if real is None else real.bool()
    u = F.normalize(x.float(), dim=-1) * real[..., None]
    sims = u @ u.transpose(1, 2)  # (B, N, N), zero rows/columns for padding
    n = real.sum(1).float()
    total = sims.sum((1, 2)) - (u * u).sum((1, 2))  # off-diagonal sum
    return total / (n * (n - 1))


def head_similarity(attn: torch.Tensor, real_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Appendix A's S_A per instance: for each query row, the mean cosine similarity over pairs of
    distinct heads of their attention distributions, averaged over the (real) rows.

    ``attn`` (B, H, Nq, Nk) attention weights; ``real_rows`` (B, Nq) bool. Returns (B,); NaN for one head."""
    B, H, Nq, _ = attn.shape
    u = F.normalize(attn.float(), dim=-1)  # (B, H, Nq, Nk)
    gram = torch.einsum("bhqk,bgqk->bqhg", u, u)  # (B, Nq, H, H)
    off = (gram.sum((2, 3)) - gram.diagonal(dim1=2, dim2=3).sum(-1)) / (H * (H - 1)) if H > 1 else \
        torch.full((B, Nq), float("nan"), device=attn.device)
    rows = torch.ones(B, Nq, dtype=torch.bool, device=attn.device) if real_rows is None else real_rows.bool()
    return torch.where(rows, off, 0.0).sum(1) / rows.sum(1).clamp_min(1)  # where: a padded row may be NaN


def _weights(q: torch.Tensor, k: torch.Tensor, attn_mask: Any = None, is_causal: bool = False,
             scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale + mask): what ``F.scaled_dot_product_attention`` weights its values by."""
    if k.shape[-3] != q.shape[-3]:  # grouped-query heads: each key head serves a group of query heads
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    s = (q.float() @ k.float().transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if is_causal:
        Nq, Nk = s.shape[-2:]
        # top-left aligned, as F.scaled_dot_product_attention(is_causal=True) builds it
        s = s.masked_fill(torch.ones(Nq, Nk, dtype=torch.bool, device=s.device).tril(0).logical_not(), float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(attn_mask.logical_not(), float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    return s.softmax(-1)


@contextlib.contextmanager
def attention_recorder(model: nn.Module, paths: list[str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """While active, the attention weights (B, H, Nq, Nk) of every ``F.scaled_dot_product_attention``
    call made inside the modules at ``paths`` are appended to ``recorded[path]`` (the call runs as it
    would). PyTorch's fused ``nn.MultiheadAttention`` fast path is turned off meanwhile, so those
    modules reach the call too."""
    recorded: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    active: list[str] = []
    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if active:
            recorded[active[-1]].append(_weights(q, k, attn_mask, is_causal, scale).detach())
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)

    def enter(path: str):
        def hook(module, args) -> None:
            active.append(path)
        return hook

    def leave(module, args, out) -> None:  # returns None: the module's output stays its own
        active.pop()

    handles = []
    for p in paths:
        module = model.get_submodule(p)
        handles.append(module.register_forward_pre_hook(enter(p)))
        handles.append(module.register_forward_hook(leave))
    fastpath = getattr(torch.backends, "mha", None)
    was_fast = fastpath.get_fastpath_enabled() if fastpath is not None else None
    F.scaled_dot_product_attention = sdpa
    try:
        if fastpath is not None:
            fastpath.set_fastpath_enabled(False)
        yield recorded
    finally:
        F.scaled_dot_product_attention = original
        if fastpath is not None:
            fastpath.set_fastpath_enabled(was_fast)
        for h in handles:
            h.remove()


def _batches(dataset: Any, instances: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    from .trainer import collate_of

    collate = collate_of(dataset)
    n = min(instances, len(dataset))
    for start in range(0, n, batch_size):
        yield collate([dataset[i] for i in range(start, min(n, start + batch_size))])


def _inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from .trainer import model_inputs

    return model_inputs(model, batch)


def similarity_profile(model: nn.Module, spec: Any, dataset: Any, instances: int = 256,
                       batch_size: int = 64) -> dict[str, Any]:
    """Fig. 2's measurements on the untrimmed ``model`` described by ``spec`` (a
    :class:`trimkit.spec.ModelSpec`) over the first ``instances`` items of ``dataset``.

    Returns ``{"tokens": {layer path: [S_T per instance]}, "heads": {layer path/attention path:
    [S_A per instance]}, "streams": {layer path: stream}}``, in forward order. A stream's padding
    (``StreamSpec.padding_input``) is left out of both (its tokens, and its query rows)."""
    paths = [layer.path for layer in spec.layers]
    attn_paths = [f"{layer.path}.{a.path}" for layer in spec.layers for a in layer.attentions]
    streams = {layer.path: layer.stream for layer in spec.layers}
    streams.update({f"{layer.path}.{a.path}": layer.stream for layer in spec.layers for a in layer.attentions})
    padding = {s.name: s.padding_input for s in spec.streams}
    tokens: dict[str, list[float]] = {p: [] for p in paths}
    heads: dict[str, list[float]] = {p: [] for p in attn_paths}
    outputs: dict[str, list[torch.Tensor]] = {}

    def keep_output(path: str, out_index: int | None):
        def hook(m, a, out):
            x = out if isinstance(out, torch.Tensor) else out[out_index or 0]
            outputs.setdefault(path, []).append(x.detach())
        return hook

    was = model.training
    model.eval()
    handles = [model.get_submodule(layer.path).register_forward_hook(keep_output(layer.path, layer.output))
               for layer in spec.layers]
    try:
        with torch.no_grad(), attention_recorder(model, attn_paths) as rec:
            for batch in _batches(dataset, instances, batch_size):
                x = _inputs(model, batch)
                outputs.clear()
                for v in rec.values():
                    v.clear()
                model(**x)
                for layer in spec.layers:
                    pad = padding.get(layer.stream)
                    for out in outputs.get(layer.path, []):
                        h = out if layer.batch_first else out.transpose(0, 1)
                        real = x[pad].bool() if pad and pad in x and x[pad].shape[1] == h.shape[1] else None
                        tokens[layer.path] += token_similarity(h, real).tolist()
                for a in attn_paths:
                    pad = padding.get(streams[a])
                    for w in rec[a]:
                        w = w.view(-1, *w.shape[-3:]) if w.dim() != 4 else w
                        real = x[pad].bool() if pad and pad in x and x[pad].shape[1] == w.shape[2] else None
                        heads[a] += head_similarity(w, real).tolist()
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return {"tokens": tokens, "heads": {a: v for a, v in heads.items() if v}, "streams": streams}


def head_retention(tmodel: nn.Module, dataset: Any, instances: int = 256, batch_size: int = 64) -> dict[str, list[float]]:
    """Fig. 6: per head trimmer (its record key, ``"LAYER.ATTENTION_INDEX"``) each instance's kept
    fraction of heads (eval mode, hard masks), over the first ``instances`` items."""
    out: dict[str, list[float]] = {}
    was = tmodel.training
    tmodel.eval()
    try:
        with torch.no_grad(), tmodel.mode("hard"):
            for batch in _batches(dataset, instances, batch_size):
                tmodel(**_inputs(tmodel, batch))
                for r in tmodel.records:
                    if r.kind == "head":
                        out.setdefault(r.key, []).extend(r.mask.float().mean(-1).tolist())
    finally:
        tmodel.train(was)
    return out


def vision_keep_masks(tmodel: nn.Module, batch: dict[str, torch.Tensor], stream: str = "vision") -> dict[str, torch.Tensor]:
    """Fig. 5: the (B, N) keep mask (1 kept) of ``stream`` after each of its trimmed layers, by layer
    path, in forward order (eval mode, hard masks: each mask is cumulative over the layers before)."""
    layer_stream = {layer.path: layer.stream for layer in tmodel.spec.layers}
    was = tmodel.training
    tmodel.eval()
    try:
        with torch.no_grad(), tmodel.mode("hard"):
            tmodel(**_inputs(tmodel, batch))
            return {r.key: r.mask.detach().clone() for r in tmodel.records
                    if r.kind == "token" and layer_stream.get(r.key) == stream}
    finally:
        tmodel.train(was)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation, NaNs left out (0 std for one value)."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    return m, (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
