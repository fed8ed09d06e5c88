"""Image-text retrieval: recall@K from a score matrix, and an evaluation that ranks every pair.

Conventions: a score matrix is ``(num_images, num_texts)``, higher is a better match;
``text_to_image[t]`` is the image text ``t`` describes (an image may have several texts, a text has
one image). ``i2t`` is image -> text retrieval (the papers' TR), ``t2i`` text -> image (IR).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

__all__ = ["evaluate_retrieval", "itm_score", "retrieval_recalls"]


def itm_score(logits: torch.Tensor) -> torch.Tensor:
    """One matching score per pair: the log-odds ``logits[:, 1] - logits[:, 0]`` of two-class ITM
    logits (monotone in the match probability), or the single logit of ``(B,)`` / ``(B, 1)`` outputs."""
    if logits.dim() == 2 and logits.shape[-1] == 2:
        return logits[:, 1] - logits[:, 0]
    if logits.dim() == 1 or (logits.dim() == 2 and logits.shape[-1] == 1):
        return logits.reshape(-1)
    raise ValueError(f"ITM logits must be (B, 2), (B, 1) or (B,), got {tuple(logits.shape)}")


def retrieval_recalls(scores: Any, text_to_image: Any, ks: Sequence[int] = (1, 5, 10),
                      scores_t2i: Any = None) -> dict[str, float]:
    """Recall@K in both directions, as fractions.

    ``i2t_r{k}``: the fraction of images with one of their texts among the ``k`` best-scored texts;
    ``t2i_r{k}``: the fraction of texts whose image is among the ``k`` best-scored images;
    ``i2t_mean`` / ``t2i_mean`` the means over ``ks`` and ``r_mean`` the mean of both (the papers'
    "mean recall"). Ties count against the ground truth (a rank is the number of other candidates
    scored at least as high) and a ground truth scored ``-inf`` (not reranked) is never retrieved.
    ``scores_t2i`` (same shape): a separate matrix for text -> image (reranking gives one per
    direction); images without any text are left out of ``i2t``.
    """
    s = torch.as_tensor(np.asarray(scores, dtype=np.float64))
    t2i_s = s if scores_t2i is None else torch.as_tensor(np.asarray(scores_t2i, dtype=np.float64))
    gt = torch.as_tensor(np.asarray(text_to_image, dtype=np.int64))
    n_img, n_txt = s.shape
    if t2i_s.shape != s.shape or gt.shape != (n_txt,):
        raise ValueError(f"scores {tuple(s.shape)}, scores_t2i {tuple(t2i_s.shape)} and text_to_image "
                         f"{tuple(gt.shape)} do not fit (num_images, num_texts) and (num_texts,)")
    if n_txt and (int(gt.min()) < 0 or int(gt.max()) >= n_img):
        raise ValueError(f"text_to_image holds image indices outside [0, {n_img})")
    # image -> text: the best-scored of its own texts against the other texts
    own = torch.zeros(n_img, n_txt, dtype=torch.bool)
    own[gt, torch.arange(n_txt)] = True
    has = own.any(1)
    best = s.masked_fill(~own, float("-inf")).max(1).values
    i2t_rank = ((s >= best[:, None]) & ~own).sum(1).double()
    i2t_rank[torch.isneginf(best)] = float("inf")
    i2t_rank = i2t_rank[has]
    # text -> image: its image against the other images
    g = t2i_s[gt, torch.arange(n_txt)]
    t2i_rank = (t2i_s >= g[None, :]).sum(0).double() - 1
    t2i_rank[torch.isneginf(g)] = float("inf")
    out: dict[str, float] = {}
    for name, rank in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        vals = [float((rank < k).double().mean()) if rank.numel() else float("nan") for k in ks]
        out.update({f"{name}_r{k}": v for k, v in zip(ks, vals)})
        out[f"{name}_mean"] = sum(vals) / len(vals)
    out["r_mean"] = (out["i2t_mean"] + out["t2i_mean"]) / 2
    return out


@torch.no_grad()
def evaluate_retrieval(score_fn: Callable[[dict[str, Any]], torch.Tensor], dataset: Any, k_rerank: int | None = None,
                       *, coarse_scores: Any = None, add_coarse: bool = False, batch_size: int = 64,
                       device: torch.device | str | None = None, ks: Sequence[int] = (1, 5, 10),
                       progress: bool = False, return_scores: bool = False,
                       cache_images: bool = True) -> dict[str, Any]:
    """Rank the images and texts of a retrieval dataset with ``score_fn`` and report recall@K.

    ``dataset``: a :class:`~trimkit_train.data.karpathy.KarpathyRetrieval` (or anything with
    ``image(i)``, ``input_ids[t]``, ``num_images``, ``num_texts``, ``text_to_image`` and
    ``collate_fn``). ``score_fn(batch) -> (B,)``: the match score of each pair of a batch in the batch
    contract (``pixel_values``, ``input_ids``, ``attention_mask``, ``labels``; and the lists
    ``image_index``, ``text_index``), e.g.
    ``lambda b: itm_score(model(**model_inputs(model, b)))``.

    ``k_rerank=None``: every (image, text) pair is scored (METER's evaluation:
    ``num_images * num_texts`` pairs). ``k_rerank=k``: ``coarse_scores`` ``(num_images, num_texts)``
    (e.g. image-text contrastive similarities) pick the ``k`` best texts of each image and the ``k``
    best images of each text, only those pairs are scored (BLIP's evaluation: ``add_coarse=True``
    adds the coarse score, as BLIP adds ITC to ITM) and the others rank last. Returns
    :func:`retrieval_recalls` (plus ``scores_i2t`` / ``scores_t2i`` with ``return_scores``).
    ``cache_images`` keeps every decoded image in memory (``num_images * 3 * S * S`` floats) so that
    reranking decodes each image once.
    """
    from tqdm.auto import tqdm

    n_img, n_txt = int(dataset.num_images), int(dataset.num_texts)
    collate = dataset.collate_fn
    gt = np.asarray(dataset.text_to_image, dtype=np.int64)
    dev = torch.device(device) if device is not None else None
    cache: dict[int, torch.Tensor] = {}

    def image(i: int) -> torch.Tensor:
        if not cache_images:
            return dataset.image(i)
        if i not in cache:
            cache[i] = dataset.image(i)
        return cache[i]

    def score(pairs: list[tuple[int, int]]) -> torch.Tensor:
        out = []
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            items = [{"pixel_values": image(i), "input_ids": dataset.input_ids[t],
                      "labels": torch.tensor(int(gt[t] == i)), "image_index": i, "text_index": t} for i, t in chunk]
            batch = collate(items)
            if dev is not None:
                batch = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            s = torch.as_tensor(score_fn(batch)).reshape(-1)
            if s.numel() != len(chunk):
                raise ValueError(f"score_fn returned {s.numel()} scores for {len(chunk)} pairs")
            out.append(s.detach().double().cpu())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    if k_rerank is None:
        full = torch.empty(n_img, n_txt, dtype=torch.float64)
        for i in tqdm(range(n_img), desc="retrieval", disable=not progress, leave=False):
            full[i] = score([(i, t) for t in range(n_txt)])
        i2t = t2i = full
    else:
        if coarse_scores is None:
            raise ValueError("evaluate_retrieval: k_rerank needs coarse_scores (num_images, num_texts)")
        coarse = torch.as_tensor(np.asarray(coarse_scores, dtype=np.float64))
        if coarse.shape != (n_img, n_txt):
            raise ValueError(f"coarse_scores is {tuple(coarse.shape)}, the dataset has {n_img} images and "
                             f"{n_txt} texts")
        i2t = torch.full((n_img, n_txt), float("-inf"), dtype=torch.float64)
        t2i = torch.full((n_img, n_txt), float("-inf"), dtype=torch.float64)
        k_t, k_i = min(int(k_rerank), n_txt), min(int(k_rerank), n_img)
        for i in tqdm(range(n_img), desc="rerank i2t", disable=not progress, leave=False):
            top = coarse[i].topk(k_t).indices.tolist()
            i2t[i, top] = score([(i, t) for t in top]) + (coarse[i, top] if add_coarse else 0.0)
        for t in tqdm(range(n_txt), desc="rerank t2i", disable=not progress, leave=False):
            top = coarse[:, t].topk(k_i).indices.tolist()
            t2i[top, t] = score([(i, t) for i in top]) + (coarse[top, t] if add_coarse else 0.0)
    out: dict[str, Any] = retrieval_recalls(i2t, gt, ks, scores_t2i=t2i)
    if return_scores:
        out.update(scores_i2t=i2t, scores_t2i=t2i)
    return out
