"""The optional dependencies of trimkit_train (``pip install "trimkit[train]"``), checked where they
are first needed so that importing the package (and listing its CLI commands) never fails."""

from __future__ import annotations

import importlib.util

#: import name -> distribution name, for the message
EXTRAS = {"accelerate": "accelerate", "sklearn": "scikit-learn", "matplotlib": "matplotlib"}


class MissingExtrasError(ImportError):
    """A training feature was used without the training extras installed."""


def require_extras(*modules: str, feature: str = "trimkit_train") -> None:
    """Raise :class:`MissingExtrasError` naming the missing distributions and the install command
    when any of the import names ``modules`` (default: all of :data:`EXTRAS`) cannot be found."""
    missing = [EXTRAS.get(m, m) for m in (modules or tuple(EXTRAS)) if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtrasError(f"{feature} needs {', '.join(missing)}, which is not installed: install the "
                                 f"training extras with  pip install \"trimkit[train]\"  (or -e \".[train]\" in a "
                                 f"checkout)")
