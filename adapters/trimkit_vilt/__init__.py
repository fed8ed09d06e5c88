"""trimkit adapter ``vilt``: transformers' ViLT (one stream: text tokens then image patches, each
part with its own [CLS]).

How trimkit sees it: one stream ``joint`` with two segments, ``text`` (as long as ``input_ids``)
and ``vision`` (the rest: the image [CLS] and its patches), so each modality has its own token
trimmer and target at every layer and scores its tokens from its own [CLS] and the other's
(SmartTrim's cross-modal policy, between segments); both [CLS] are always kept. Padding (text
padding and ViLT's padded patches) is the mask ViLT's embeddings build (``padding_source``). Every
encoder layer is trimmed; its attention (explicit softmax(QK^T)V, no RoPE) is recomputed from its
``query``/``key``/``value`` so dropped heads skip their projections too.

ViLT's forward checks shapes with Python ``if``s, which torch.fx cannot trace, so trim the thin
wrapper :func:`wrap` returns (same weights): it names the inputs and calls ViLT's own embeddings,
layers, final norm, pooler and head.

>>> import trimkit
>>> from trimkit_vilt import wrap
>>> tmodel = trimkit.trim(wrap(ViltForQuestionAnswering.from_pretrained(...)),
...                       trimkit.TrimConfig(token_target={"text": 0.8, "vision": 0.5}))

Pretrained, offline and already wrapped: ``trimkit.adapter.load_pretrained("vilt",
"dandelin/vilt-b32-finetuned-vqa")`` (a local directory, or a model id in the local HF cache; see
:meth:`ViltAdapter.from_pretrained`).
"""

from __future__ import annotations

from trimkit.plugins import hookimpl

from .adapter import TINY, ViltAdapter, wrap

__all__ = ["TINY", "ViltAdapter", "ViltForTrimming", "describe_vilt", "wrap"]

_LAZY = {"ViltForTrimming": "modeling", "describe_vilt": "adapter"}


def __getattr__(name: str):  # transformers' ViLT is imported on first use, not with the plugin
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl
def trimkit_register_adapters(registry):
    registry.adapters.register("vilt", ViltAdapter())
