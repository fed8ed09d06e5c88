import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))


def _register_toy():
    """The global registry with the test's ToyAdapter registered as 'toy' (a third party's adapter)."""
    from toyvlm import ToyAdapter

    from trimkit.plugins import get_registry

    registry = get_registry()
    registry.adapters.register("toy", ToyAdapter(), replace=True)
    return registry


@pytest.fixture
def toy_registry():
    return _register_toy()


@pytest.fixture(scope="module")
def toy_registry_module():
    return _register_toy()
