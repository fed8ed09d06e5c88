"""Load official METER checkpoints (github.com/zdou0830/METER) into :class:`MeterModel`.

The official ``METERTransformerSS`` (a Lightning module, ``meter/modules/meter_module.py``) saves
``{"state_dict": {...}}`` with (the CLIP ViT + RoBERTa variant; every key and its shape in terms of
METER's config: ``tests/data/meter_official_keys.txt``):

* ``vit_model.visual.*``: the vision tower of METER's own CLIP copy (``meter/modules/clip_model.py``):
  ``conv1`` (no bias), ``class_embedding``, ``positional_embedding`` (sized for the fine-tuning
  resolution), ``ln_pre``, ``transformer.resblocks.N.{attn,ln_1,mlp.c_fc,mlp.c_proj,ln_2}`` (one
  block fewer than CLIP's: ViT-B/16 keeps 11) and ``ln_post``; it has no ``proj``. Next to it, the
  two leftovers of CLIP's text tower that copy keeps, ``vit_model.positional_embedding`` (77 x 512)
  and ``vit_model.ln_final``, which METER never uses;
* ``text_transformer.*``: a ``RobertaModel`` with its (unused) ``pooler`` and, as transformers 4.6
  saved it, the ``embeddings.position_ids`` buffer;
* ``cross_modal_{text,image}_transform``, ``token_type_embeddings`` (a third row for NLVR2),
  ``cross_modal_{image,text}_layers.N.{attention,crossattention}.{self.{query,key,value},
  output.{dense,LayerNorm}}``, ``...intermediate.dense``, ``...output.{dense,LayerNorm}``,
  ``cross_modal_{image,text}_pooler.dense``;
* heads by the run's ``loss_names``: ``vqa_classifier.{0,1,3}``, ``nlvr2_classifier``,
  ``snli_classifier``, ``itm_score.fc`` (pre-training and retrieval), the pre-training-only
  ``mlm_score.*`` and the retrieval-only ``rank_output``.

:class:`MeterModel` mirrors these names, so conversion only flattens ``vit_model.visual.`` to
``vit_model.``, drops what the model does not have (and reports why), and adapts two shapes to
the target config: the visual position table (bicubic interpolation of the patch grid, as METER's
``adapt_position_encoding`` does) and the token-type table (NLVR2 has a third row, initialised
from the image row as METER does). METER's Swin variant (``avgpool``, a Swin ``vit_model``) is
not a :class:`MeterModel`: its vision keys are reported as unexpected.
"""

from __future__ import annotations

import logging
import math
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .modeling import HEAD_NAMES, MeterConfig, MeterModel

__all__ = ["MeterCheckpointError", "MeterConversion", "checkpoint_tasks", "convert_meter_checkpoint",
           "convert_meter_state_dict", "interpolate_pos_embed", "load_meter_checkpoint", "read_meter_checkpoint"]

logger = logging.getLogger(__name__)

_VISUAL = "vit_model.visual."
_ALWAYS_DROPPED = {  # prefix -> why MeterModel has no such parameter
    "vit_model.proj": "CLIP's image projection (METER uses all tokens before it)",
    "text_transformer.pooler.": "RoBERTa's pooler (METER pools after the cross-modal encoder)",
    "text_transformer.embeddings.position_ids": "a derived buffer, not a weight",
    "text_transformer.embeddings.token_type_ids": "a derived buffer, not a weight",
    "mlm_score.": "the pre-training masked-language-modelling head",
    "rank_output.": "the retrieval ranking head (METER starts it from row 1 of itm_score.fc)",
    "avgpool.": "the Swin pooling of METER's non-CLIP variant",
}


class MeterCheckpointError(RuntimeError):
    """A checkpoint does not fit the model; the message names the offending keys."""


@dataclass
class MeterConversion:
    """What :func:`convert_meter_checkpoint` produced and why.

    ``state_dict``: keys of :class:`MeterModel`. ``dropped``: checkpoint key -> reason it was left
    out. ``adapted``: converted key -> what was changed (interpolated, rows added...).
    ``missing`` / ``unexpected`` / ``mismatched``: filled by :func:`load_meter_checkpoint`
    (model keys the checkpoint lacks, checkpoint keys the model lacks, and
    ``key -> (checkpoint shape, model shape)``).
    """

    state_dict: dict[str, torch.Tensor]
    dropped: dict[str, str] = field(default_factory=dict)
    adapted: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)


def _unwrap(sd: Mapping) -> Mapping:
    """The weights inside a Lightning (``state_dict``) or plain (``model``) checkpoint dict."""
    for key in ("state_dict", "model"):
        inner = sd.get(key)
        if isinstance(inner, Mapping) and not isinstance(inner, torch.Tensor):
            return inner
    return sd


def interpolate_pos_embed(pos: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Resize a ViT position table (1 + G*G, D) to (1 + num_patches, D), [CLS] row kept.

    The patch grid is resized with bicubic interpolation, like METER's ``adapt_position_encoding``.
    """
    squeeze = pos.dim() == 3
    table = pos[0] if squeeze else pos
    before, after = math.isqrt(table.shape[0] - 1), math.isqrt(num_patches)
    if before * before != table.shape[0] - 1 or after * after != num_patches:
        raise MeterCheckpointError(f"cannot interpolate a position table of {table.shape[0] - 1} patches to "
                                   f"{num_patches}: both must be square grids")
    dim = table.shape[1]
    grid = table[1:].reshape(before, before, dim).permute(2, 0, 1)[None].float()
    grid = F.interpolate(grid, size=(after, after), mode="bicubic", align_corners=False)
    grid = grid[0].permute(1, 2, 0).reshape(after * after, dim).to(table.dtype)
    out = torch.cat([table[:1], grid], dim=0)
    return out[None] if squeeze else out


def convert_meter_checkpoint(sd: Mapping[str, torch.Tensor], config: MeterConfig | None = None) -> MeterConversion:
    """Map an official METER state dict (or a whole Lightning checkpoint) to :class:`MeterModel` keys.

    Without ``config`` only the key layout changes and parameters no ``MeterModel`` has are
    dropped. With ``config``, heads of other tasks are dropped too, the visual position table is
    interpolated to ``config.image_size`` and the token-type table is sized for ``config.task``.
    Keys this function does not know are kept (loading reports them as unexpected). Already
    converted state dicts pass through unchanged.
    """
    sd = _unwrap(sd)
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DistributedDataParallel wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
    nested = any(k.startswith(_VISUAL) for k in sd)
    out: dict[str, torch.Tensor] = {}
    conv = MeterConversion(out)
    other_heads = {name: task for task, name in HEAD_NAMES.items()} if config is not None else {}
    if config is not None:
        other_heads.pop(HEAD_NAMES[config.task])
    for key, value in sd.items():
        if nested and key.startswith("vit_model."):
            if not key.startswith(_VISUAL):
                conv.dropped[key] = "CLIP text-tower leftover in METER's CLIP model"
                continue
            new = "vit_model." + key[len(_VISUAL):]
        else:
            new = key
        reason = next((why for prefix, why in _ALWAYS_DROPPED.items() if new.startswith(prefix)), None)
        head = new.split(".", 1)[0]
        if reason is None and head in other_heads:
            reason = f"head of task {other_heads[head]!r} (the model's task is {config.task!r})"
        if reason is not None:
            conv.dropped[key] = reason
            continue
        out[new] = value
    if config is not None:
        _adapt_shapes(conv, config)
    if conv.dropped:
        logger.info("METER conversion dropped %d keys: %s", len(conv.dropped), sorted(conv.dropped))
    return conv


def _adapt_shapes(conv: MeterConversion, config: MeterConfig) -> None:
    sd = conv.state_dict
    key = "vit_model.positional_embedding"
    if key in sd and sd[key].shape[-2] != config.num_patches + 1:
        before = tuple(sd[key].shape)
        sd[key] = interpolate_pos_embed(sd[key], config.num_patches)
        conv.adapted[key] = f"interpolated {before} -> {tuple(sd[key].shape)} for image_size={config.image_size}"
    key = "token_type_embeddings.weight"
    if key in sd and sd[key].shape[0] != config.num_token_types:
        rows, want = sd[key].shape[0], config.num_token_types
        if rows == 2 and want == 3:  # METER's NLVR2 init: the second image's type starts as the image type
            sd[key] = torch.cat([sd[key], sd[key][1:2]], dim=0)
            conv.adapted[key] = "added row 2 (second NLVR2 image) as a copy of row 1 (image)"
        elif rows == 3 and want == 2:
            sd[key] = sd[key][:2]
            conv.adapted[key] = "dropped row 2 (second NLVR2 image): the task has one image"


def convert_meter_state_dict(sd: Mapping[str, torch.Tensor],
                             config: MeterConfig | None = None) -> dict[str, torch.Tensor]:
    """Official METER state dict -> :class:`MeterModel` state dict (see :func:`convert_meter_checkpoint`).

    Dropped keys are logged at INFO level; use :func:`convert_meter_checkpoint` to get them.
    """
    return convert_meter_checkpoint(sd, config).state_dict


def read_meter_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> Mapping[str, torch.Tensor]:
    """The contents of a METER checkpoint file: ``.safetensors``, or a torch file read with
    ``torch.load(weights_only=True)``; ``allow_pickle=True`` (only for a file you trust) reads a
    Lightning checkpoint whose other entries are pickled Python objects, as METER's released
    ``.ckpt`` files are. Raises :class:`MeterCheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise MeterCheckpointError(f"{path}: " + ("a directory, not a checkpoint file" if path.is_dir() else
                                                  "no such file"))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:
            raise MeterCheckpointError(f"{path}: not a readable safetensors file ({err}); it is damaged or "
                                       "truncated (an interrupted copy or download?)") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as err:
        with open(path, "rb") as f:
            head = f.read(2)
        torch_file = zipfile.is_zipfile(path) or head[:1] == b"\x80"  # torch.save's zip, or its legacy pickle
        if torch_file and not allow_pickle:
            raise MeterCheckpointError(
                f"{path} could not be read with torch.load(weights_only=True): {err}\nIf you trust the file, pass "
                "allow_pickle=True, or extract its weights once: torch.save(torch.load(path, weights_only=False)"
                "['state_dict'], 'meter.pt')") from err
        if not torch_file:
            raise MeterCheckpointError(f"{path}: not a torch checkpoint (neither torch.save's zip archive nor its "
                                       "legacy pickle): the file is damaged or truncated (an interrupted copy or "
                                       "download?), or another kind of file") from None
        raise MeterCheckpointError(f"{path}: could not be read as a torch checkpoint ({type(err).__name__}: {err}); "
                                   "it is damaged or truncated, or not a checkpoint") from err


_read = read_meter_checkpoint


def checkpoint_tasks(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Task -> number of labels of each task head in a METER state dict (official or converted,
    or a whole Lightning checkpoint): ``{"vqa": 3129}`` for METER's VQAv2 checkpoint, ``{"itm": 2}``
    for the pre-training and retrieval ones."""
    sd = _unwrap(sd)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    out = {}
    for task, name in HEAD_NAMES.items():
        weight = sd.get(f"{name}.fc.weight" if task == "itm" else f"{name}.3.weight")
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            out[task] = int(weight.shape[0])
    return out


def load_meter_checkpoint(checkpoint: str | os.PathLike | Mapping[str, torch.Tensor], model: MeterModel,
                          strict: bool = True, *, new_head: bool = False,
                          allow_pickle: bool = False) -> MeterConversion:
    """Load an official (or already converted) METER checkpoint into ``model``.

    ``checkpoint`` is a path (:func:`read_meter_checkpoint`: ``torch.load`` with
    ``weights_only=True`` unless ``allow_pickle``, or ``.safetensors``) or a loaded dict; a
    Lightning ``{"state_dict": ...}`` wrapper is unwrapped. The weights are converted for
    ``model.config``. With ``strict`` any missing, unexpected or shape-mismatched key raises
    :class:`MeterCheckpointError` naming them and nothing is loaded; otherwise the matching
    weights are loaded and the rest is reported in the returned :class:`MeterConversion`.
    ``new_head=True`` keeps the model's own task head (its initialisation): the checkpoint's head
    for the task, if any, is reported as dropped and a missing one is not a problem, so a
    pre-training checkpoint loads strictly into a model for a new task.
    """
    raw = checkpoint if isinstance(checkpoint, Mapping) else read_meter_checkpoint(checkpoint, allow_pickle)
    conv = convert_meter_checkpoint(raw, model.config)
    expected = model.state_dict()
    got = conv.state_dict
    head = model.head_name + "."
    if new_head:
        for key in [k for k in got if k.startswith(head)]:
            conv.dropped[key] = "new_head=True: the model's task head keeps its own initialisation"
            del got[key]
    conv.missing = sorted(k for k in expected if k not in got and not (new_head and k.startswith(head)))
    conv.unexpected = sorted(k for k in got if k not in expected)
    conv.mismatched = {k: (tuple(got[k].shape), tuple(expected[k].shape))
                       for k in got if k in expected and got[k].shape != expected[k].shape}
    problems = []
    if conv.missing:
        problems.append(f"missing keys ({len(conv.missing)}): {_listing(conv.missing)}")
    if conv.unexpected:
        problems.append(f"unexpected keys ({len(conv.unexpected)}): {_listing(conv.unexpected)}")
    if conv.mismatched:
        items = [f"{k}: checkpoint {a} vs model {b}" for k, (a, b) in sorted(conv.mismatched.items())]
        problems.append(f"shape mismatches ({len(items)}): {_listing(items)}")
    if problems and strict:
        raise MeterCheckpointError("checkpoint does not fit the model (" + model.config.task + " task):\n  "
                                   + "\n  ".join(problems) + "\nPass strict=False to load the matching weights.")
    loadable = {k: v for k, v in got.items() if k in expected and k not in conv.mismatched}
    model.load_state_dict(loadable, strict=False)
    for problem in problems:
        logger.warning("METER checkpoint: %s", problem)
    return conv


def _listing(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
