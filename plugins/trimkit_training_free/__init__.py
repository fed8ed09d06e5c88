"""Training-free token policies for trimkit, packaged as a plugin registered like a third party's.

* ``fastv`` (:class:`FastVTokenPolicy`, Chen et al. 2024): keep the tokens most attended by the last
  token in the layer before; for decoder VLMs (the ``llava`` adapter), placed at FastV's layer K.
* ``visionzip`` (:class:`VisionZipTokenPolicy`, Yang et al. 2024, dominant-token selection; the
  merging of context tokens is left out, see its docstring): keep the tokens most attended by
  [CLS] in the layer before, plus evenly spread context tokens; for encoders with a [CLS] (``timm``)
  and the vision towers of the decoder VLMs (``llava``, ``qwen2_vl`` with ``vision_trim_layers``; Qwen2-VL's
  tower has no [CLS], so its "first" row is its first patch, and its tokens go in 2x2 runs: a run is
  kept where most of its patches were chosen, ``StreamSpec.group``).

Neither has parameters: select one as ``TrimConfig.token_policy``; its layer(s) with
``token_layers`` and its keep ratio with ``token_target`` (the same targets as SmartTrim's learned
policy); they run in modes ``hard``/``sample`` (masked) and ``remove`` (batch 1), not ``packed``.

>>> cfg = trimkit.TrimConfig(token_policy="fastv", token_layers=["seq.uni.2"], token_target={"image": 0.5},
...                          trim_heads=False)
>>> tmodel = trimkit.trim(llava, cfg)   # image tokens halved from decoder layer 2 on

This package reaches trimkit only through the ``trimkit`` entry-point group
(``training_free = "trimkit_training_free"`` in ``pyproject.toml``) and the
``trimkit_register_token_policies`` hook; what the policies read is the core's
:class:`trimkit.probe.TokenContext` (``uses_context = True``, see :class:`trimkit.protocols.TokenPolicy`).
"""

from __future__ import annotations

from trimkit.plugins import hookimpl

from .policies import LOGIT, FastVTokenPolicy, VisionZipTokenPolicy, top_budget

__all__ = ["FastVTokenPolicy", "VisionZipTokenPolicy", "LOGIT", "top_budget"]


@hookimpl
def trimkit_register_token_policies(registry):
    registry.token_policies.register("fastv", FastVTokenPolicy)
    registry.token_policies.register("visionzip", VisionZipTokenPolicy)
