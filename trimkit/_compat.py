"""Import shims for broken third-party installs, applied only when needed.

torchvision wheels from the registry are CUDA builds. On a CPU-only torch, ``import torchvision``
fails with ``operator torchvision::nms does not exist`` because its meta-registrations reference
operator schemas that its (unloadable) C++ extension would have defined. timm, open_clip and
transformers' BLIP import torchvision, so the whole stack fails. Defining the two schemas before
the import lets the pure-Python parts of torchvision load; the ops themselves stay unavailable
(trimkit never calls them).
"""

from __future__ import annotations

import importlib
import sys

_APPLIED = False
_LIB = None  # keep the torch.library.Library alive: dropping it unregisters the schemas


def ensure_torchvision() -> None:
    """Make ``import torchvision`` work on a CPU-only torch. No-op when it already works."""
    global _APPLIED, _LIB
    if _APPLIED or "torchvision" in sys.modules:
        return
    _APPLIED = True
    try:
        importlib.import_module("torchvision")
        return
    except ModuleNotFoundError:
        return  # not installed: the libraries that need it will say so themselves
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    import torch

    _LIB = torch.library.Library("torchvision", "DEF")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    importlib.import_module("torchvision")
