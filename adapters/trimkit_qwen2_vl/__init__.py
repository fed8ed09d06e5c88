"""trimkit adapter ``qwen2_vl`` (placeholder docstring)."""

from __future__ import annotations

from trimkit.plugins import hookimpl

from .adapter import TINY_TEXT, TINY_VISION, TINY_VISION_2_5, Qwen2VLAdapter, describe_qwen2_vl, wrap

__all__ = ["TINY_TEXT", "TINY_VISION", "TINY_VISION_2_5", "MRopePositions", "Qwen2VLAdapter", "Qwen2VLForTrimming",
           "batch_pixel_values", "describe_qwen2_vl", "flat_pixel_values", "generate", "prefill", "qwen2_vl_segment_starts",
           "wrap"]

_LAZY = {"Qwen2VLForTrimming": "modeling", "MRopePositions": "modeling", "batch_pixel_values": "modeling",
         "flat_pixel_values": "modeling", "qwen2_vl_segment_starts": "modeling", "generate": "generation",
         "prefill": "generation"}


def __getattr__(name: str):  # modeling is imported on first use (keeps the plugin minimal)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl
def trimkit_register_adapters(registry):
    registry.adapters.register("qwen2_vl", Qwen2VLAdapter())
