"""trimkit adapter ``bridgetower``: transformers' ``BridgeTowerModel`` (METER's family, with link towers).

Wrap the model first (its forward cannot be traced by torch.fx as it is)::

    import trimkit
    from trimkit_bridgetower import wrap
    tmodel = trimkit.trim(wrap(BridgeTowerModel.from_pretrained(...)),
                          trimkit.TrimConfig(token_target={"vision": 0.5, "text": 0.8}))

Trimmed: the cross-modal layers of both streams (tokens, self- and cross-attention heads). The
link towers' uni-modal inputs are gathered to the kept tokens (``ModelSpec.token_args``).
Not trimmed: the uni-modal encoders. Their top layers run in parallel with the cross-modal layers
and feed them through the link towers; trimming them would need the core to align a tensor between
two token states of one stream (uni-modal positions vs cross-modal positions), which it cannot.
Outputs: ``(text_features, image_features, pooler_output)``; the task heads
(``BridgeTowerForImageAndTextRetrieval``...) are not wrapped.

Pretrained, offline and already wrapped: ``trimkit.adapter.load_pretrained("bridgetower",
"BridgeTower/bridgetower-base")`` (see :meth:`BridgeTowerAdapter.from_pretrained`).
"""

from __future__ import annotations

from trimkit.plugins import hookimpl

from .adapter import TINY, BridgeTowerAdapter, wrap

__all__ = ["BridgeTowerAdapter", "BridgeTowerForTrimming", "TINY", "describe_bridgetower", "wrap"]

_LAZY = {"BridgeTowerForTrimming": "modeling", "describe_bridgetower": "spec"}


def __getattr__(name: str):  # transformers' BridgeTower is imported on first use, not with the plugin
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl
def trimkit_register_adapters(registry):
    registry.adapters.register("bridgetower", BridgeTowerAdapter())
