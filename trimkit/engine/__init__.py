"""The inference engine: what runs when tokens and heads are really dropped.

* batch 1 (mode ``remove``): :mod:`trimkit.ops` gathers the kept tokens and computes only the kept
  heads (one host synchronisation per layer);
* batches (mode ``packed``): :mod:`trimkit.engine.packed` keeps the kept tokens of the whole batch
  in one row matrix and runs attention per instance by cumulative sequence lengths;
* :mod:`trimkit.engine.calibrate` sets untrained trimmers to reach a MACs reduction (profiling);
* :mod:`trimkit.engine.timing` measures two callables interleaved (speed as a ratio).
"""

from .packed import Packing, varlen_attention

__all__ = ["Packing", "varlen_attention"]
