"""trimkit adapter for METER (Dou et al. 2022), the SmartTrim paper's first backbone.

Registered through the ``trimkit`` entry point exactly like a third-party adapter::

    from trimkit_meter import build_meter
    from trimkit import trim, TrimConfig
    tmodel = trim(build_meter("tiny"), TrimConfig(token_target={"vision": 0.5, "text": 0.8}))

From an official METER checkpoint (converted by :mod:`trimkit_meter.convert`)::

    from trimkit.adapter import load_pretrained
    model = load_pretrained("meter", "meter_clip16_288_roberta_vqa.ckpt", allow_pickle=True)  # a file you trust
"""

from __future__ import annotations

from typing import Any

from trimkit.plugins import hookimpl

from .convert import (
    MeterCheckpointError,
    checkpoint_tasks,
    convert_meter_checkpoint,
    convert_meter_state_dict,
    load_meter_checkpoint,
    read_meter_checkpoint,
)
from .modeling import METER_BASE, METER_TINY, MeterConfig, MeterModel, build_meter
from .spec import describe_meter, meter_example_inputs

__all__ = [
    "METER_BASE", "METER_TINY", "MeterAdapter", "MeterCheckpointError", "MeterConfig", "MeterModel", "build_meter",
    "checkpoint_tasks", "convert_meter_checkpoint", "convert_meter_state_dict", "describe_meter",
    "load_meter_checkpoint", "meter_example_inputs", "read_meter_checkpoint",
]


class MeterAdapter:
    """Describes :class:`MeterModel` to trimkit; builds ``tiny`` and ``base`` (paper, 288px) models."""

    def matches(self, model) -> bool:
        return isinstance(model, MeterModel)

    def describe(self, model: MeterModel):
        return describe_meter(model)

    def example_inputs(self, model: MeterModel, batch_size: int = 1, seed: int = 0) -> dict[str, Any]:
        return meter_example_inputs(model, batch_size=batch_size, seed=seed)

    def build(self, size: str = "tiny", seed: int = 0, **options: Any) -> MeterModel:
        import torch

        torch.manual_seed(seed)
        return build_meter(size, **options)

    def dataset_overrides(self, facts) -> dict[str, Any]:
        """Build options that fit a dataset (:class:`trimkit.adapter.DatasetFacts`): image and patch
        size, the tokenizer's vocabulary and special ids, ``num_labels``, ``task`` from the
        dataset's variant, and text lengths that hold its longest question."""
        out: dict[str, Any] = {}
        if facts.image_size is not None:
            out["image_size"] = facts.image_size
        if facts.patch_size is not None:
            out["patch_size"] = facts.patch_size
        tok = facts.tokenizer
        if tok is not None:
            out.update(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id, cls_token_id=tok.cls_token_id,
                       eos_token_id=tok.sep_token_id)
        if facts.num_labels is not None:
            out["num_labels"] = facts.num_labels
        if facts.variant is not None:
            out["task"] = facts.variant
        if facts.longest_text is not None:
            out.update(max_text_len=max(16, facts.longest_text), text_max_positions=max(32, facts.longest_text + 2))
        return out

    def from_pretrained(self, source: str, *, revision: str | None = None, weights: str | None = None,
                        size: str | None = None, seed: int | None = None, new_head: bool = False,
                        allow_pickle: bool = False, **options: Any) -> MeterModel:
        """A :class:`MeterModel` with pretrained weights (in eval mode), read offline.

        ``source`` is an official METER checkpoint file (``meter_clip16_288_roberta_vqa.ckpt``...:
        Lightning's ``{"state_dict": ...}``, or its extracted state dict, ``.pt`` or
        ``.safetensors``), converted by :func:`~trimkit_meter.convert.load_meter_checkpoint` (visual
        positions interpolated to ``image_size``, NLVR2's token types), or a trimkit checkpoint
        directory (``save_pretrained`` of a trimmed METER with its backbone), whose recorded build
        options are the defaults here. The model is ``build_meter(size, **options)``: ``size``
        ``"base"`` by default (the paper's METER: the released checkpoints' sizes); ``task`` and
        ``num_labels`` default to the checkpoint's task head. Every weight must load (strictly),
        except the task head with ``new_head=True`` (it keeps its random initialisation, seeded by
        ``seed``: fine-tuning a new task, e.g. from the pre-training checkpoint). METER's released
        ``.ckpt`` files pickle Python objects next to the weights: ``allow_pickle=True`` reads
        them (only for files you trust). ``revision`` and ``weights`` are not used.
        """
        from pathlib import Path

        import torch

        from trimkit.adapter import PretrainedLoadError, PretrainedNotFoundError, set_base

        where = f"trimkit_meter.from_pretrained({source!r})"
        for name, value in (("revision", revision), ("weights", weights)):
            if value is not None:
                raise TypeError(f"{where}: {name}={value!r} is not used: a METER source is a checkpoint file or a "
                                "trimkit checkpoint directory")
        path = Path(source).expanduser()
        if not path.exists():
            raise PretrainedNotFoundError(f"{where}: {source}: no such file or directory (expected an official METER "
                                          "checkpoint file, e.g. meter_clip16_288_roberta_vqa.ckpt, or a trimkit "
                                          "checkpoint directory)")
        if path.is_dir():
            sd, saved = _trimkit_backbone(path, where)
            options = {**{k: v for k, v in saved.items() if k != "seed"}, **options}
            size = size or options.pop("size", None)
        else:
            try:
                sd = read_meter_checkpoint(path, allow_pickle=allow_pickle)
            except MeterCheckpointError as e:
                raise PretrainedLoadError(f"{where}: {e}") from e
        options.pop("size", None)
        size = size or "base"
        tasks = checkpoint_tasks(sd)
        if "task" not in options:
            if len(tasks) != 1:
                found = (f"task heads for {', '.join(sorted(tasks))}" if tasks else
                         "no task head (vqa_classifier, nlvr2_classifier, snli_classifier or itm_score)")
                raise PretrainedLoadError(f"{where}: the checkpoint has {found}: pass task= (with new_head=True for "
                                          "a head it does not have)")
            options["task"] = next(iter(tasks))
        if "num_labels" not in options and options["task"] in tasks and not new_head:
            options["num_labels"] = tasks[options["task"]]
        torch.manual_seed(0 if seed is None else seed)
        model = build_meter(size, **options)
        try:
            load_meter_checkpoint(sd, model, strict=True, new_head=new_head)
        except MeterCheckpointError as e:
            hint = (f"\nThe checkpoint's sizes are not size={size!r}'s with {options}: pass the size and options "
                    "that match it (the released METER checkpoints are size='base')") if "shape" in str(e) else ""
            raise PretrainedLoadError(f"{where}: {e}{hint}") from None
        return set_base(model.eval(), source, None)


def _trimkit_backbone(directory, where: str) -> tuple[dict, dict]:
    """The backbone weights of a trimkit checkpoint directory of a METER model, and the build
    options it recorded (``{}`` when none)."""
    from trimkit.adapter import PretrainedLoadError
    from trimkit.checkpoint import CheckpointError, check_backbone, read_meta, read_tensors

    try:
        meta = read_meta(directory)
    except CheckpointError as e:
        raise PretrainedLoadError(f"{where}: {directory} is a directory but not a trimkit checkpoint of METER (a "
                                  f"METER source is a checkpoint file or such a directory): {e}") from None
    if meta.adapter != "meter":
        raise PretrainedLoadError(f"{where}: {meta.path} was saved with adapter {meta.adapter!r}, not 'meter'")
    try:
        backbone = check_backbone(meta, require=True)
        sd = read_tensors(backbone, meta)
    except CheckpointError as e:
        base = getattr(meta, "base_model", None)
        raise PretrainedLoadError(f"{where}: {e}" + (f" (its base model: {base!r})" if base else "")) from None
    return sd, dict(getattr(meta, "build_options", None) or {})


@hookimpl
def trimkit_register_adapters(registry):
    registry.adapters.register("meter", MeterAdapter())
