"""trimkit: SmartTrim adaptive token and head trimming for vision-language transformers.

>>> from trimkit import trim, TrimConfig
>>> tmodel = trim(model, TrimConfig(token_target={"vision": 0.5, "text": 0.8}, head_target=0.6))
"""

from ._compat import ensure_torchvision

ensure_torchvision()

from .config import TrimConfig, TrimConfigError  # noqa: E402
from .model import TrimmedModel, load_trimmed, trim  # noqa: E402
from .plugins import get_registry, hookimpl  # noqa: E402
from .entry import restore_tokens  # noqa: E402
from .spec import (AttentionSpec, AttnCall, LayerSpec, ModelSpec, Segment, StreamSpec, StreamUpdate,  # noqa: E402
                   TokenArg, TokensFrom)

__version__ = "0.1.0"
__all__ = [
    "trim", "TrimConfig", "TrimConfigError", "TrimmedModel", "load_trimmed", "get_registry", "hookimpl",
    "AttentionSpec", "AttnCall", "LayerSpec", "ModelSpec", "Segment", "StreamSpec", "StreamUpdate", "TokenArg",
    "TokensFrom", "restore_tokens",
]
