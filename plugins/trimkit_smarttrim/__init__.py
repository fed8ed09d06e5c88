"""SmartTrim's method parts as a trimkit plugin (registered through the ``trimkit`` entry point).

Policies ``cross_modal`` (Eq. 3-7), ``local`` and ``random`` (the §6.1 token baselines), ``trips`` (a
TRIPS-style static baseline: a fixed share of tokens by a text-guided score), head policy
``static`` (fixed heads: the §6.1 head baselines); samplers
``gumbel`` (Eq. 8), ``hard_st`` and ``sharpen`` (noise shrinking with the temperature); objective
``smarttrim`` (Eq. 9-12); schedulers ``linear`` (the curriculum) and ``constant``. A third-party
plugin registers its own parts the same way.
"""

from __future__ import annotations

from trimkit.plugins import hookimpl

from .objectives import SmartTrimObjective, cost_loss, self_distillation, softmax_kl
from .policies import (CrossModalHeadPolicy, CrossModalTokenPolicy, LocalTokenPolicy, RandomTokenPolicy,
                       StaticHeadPolicy, TripsTokenPolicy, random_init)
from .samplers import gumbel_sigmoid, hard_straight_through, sharpened
from .schedulers import ConstantTargets, LinearCurriculum

__all__ = [
    "SmartTrimObjective", "cost_loss", "self_distillation", "softmax_kl", "CrossModalHeadPolicy", "CrossModalTokenPolicy",
    "LocalTokenPolicy", "RandomTokenPolicy", "StaticHeadPolicy", "TripsTokenPolicy", "gumbel_sigmoid", "hard_straight_through", "sharpened", "ConstantTargets",
    "LinearCurriculum", "random_init",
]


@hookimpl
def trimkit_register_token_policies(registry):
    registry.token_policies.register("cross_modal", CrossModalTokenPolicy)
    registry.token_policies.register("local", LocalTokenPolicy)
    registry.token_policies.register("random", RandomTokenPolicy)
    registry.token_policies.register("trips", TripsTokenPolicy)


@hookimpl
def trimkit_register_head_policies(registry):
    registry.head_policies.register("cross_modal", CrossModalHeadPolicy)
    registry.head_policies.register("static", StaticHeadPolicy)


@hookimpl
def trimkit_register_samplers(registry):
    registry.samplers.register("gumbel", gumbel_sigmoid)
    registry.samplers.register("hard_st", hard_straight_through)
    registry.samplers.register("sharpen", sharpened)


@hookimpl
def trimkit_register_objectives(registry):
    registry.objectives.register(
        "smarttrim", lambda config, task=None: SmartTrimObjective.from_recipe(config, task))


@hookimpl
def trimkit_register_schedulers(registry):
    registry.schedulers.register("linear", lambda config: LinearCurriculum(config.curriculum_fraction, config.temperature,
                                                                         config.final_temperature))
    registry.schedulers.register("constant", lambda config: ConstantTargets(0.0, config.temperature,
                                                                          config.final_temperature))
