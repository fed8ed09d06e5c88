"""Runs the code of docs/bring-your-own-vlm.md, block by block, in one namespace."""

import re
import sys
import types
from pathlib import Path

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "bring-your-own-vlm.md"


def test_guide_code_runs():
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert len(blocks) >= 5
    module = types.ModuleType("trimkit_guide_example")
    sys.modules[module.__name__] = module
    try:
        for i, code in enumerate(blocks):
            exec(compile(code, f"{GUIDE.name}[block {i}]", "exec"), module.__dict__)
        assert module.report.ok
        assert set(module.losses) >= {"loss", "task", "cost", "sd"}
    finally:
        del sys.modules[module.__name__]
