"""One conformance suite over every registered adapter: ``trimkit check`` must pass (trace, all-ones ==
original, masked == removed, packed == masked with padding and per-instance counts, MACs fall).

The adapters are collected at import time (the tests' ``toy`` registered too); see
:mod:`conformance` for the build variants and the skips allowed.
"""

import pytest
from conformance import VARIANTS, adapter_names, assert_conforms, cases

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = adapter_names()


@pytest.mark.parametrize("name, options", cases(NAMES))
def test_adapter_conforms(name, options, toy_registry):  # toy_registry: re-registers 'toy' if the registry was rebuilt
    assert_conforms(name, options)


def test_suite_covers_every_adapter_and_variant():
    assert "toy" in NAMES
    missing = sorted(set(VARIANTS) - set(NAMES))
    assert not missing, f"VARIANTS names adapters that are not registered: {missing}"
