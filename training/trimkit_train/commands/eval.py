"""``trimkit eval --checkpoint DIR [--split S] [--data FILE] [--instances N] [--macs-instances M] [--batch-size B]
[--inference remove|packed|padded|hard] [--json]``: accuracy, GMACs full vs trimmed, keep ratios (see
:data:`DESCRIPTION`)."""

from __future__ import annotations

import json
import sys
import warnings

from trimkit.commands._args import nonneg_int, positive_int

INFERENCE = ("remove", "packed", "padded", "hard")

DESCRIPTION = """\
Evaluate a checkpoint: the metrics of its task (accuracy; VQA score; recall@K; BLEU-4/CIDEr),
mean GMACs per instance (full vs trimmed) and keep ratios. Metrics run in eval mode in batches of
``--batch-size`` (default: train.eval_batch_size of the run); how a trimmed model runs those batches is ``--inference`` (``TrimmedModel.inference``), and
the output says which it used: ``remove`` (the default) removes tokens and heads at batch 1 but
runs larger batches masked (the same decisions and, by the mask contract, the same outputs; no
compute saved), ``packed``/``padded`` run them on the kept tokens only, ``hard`` always masks.
GMACs are counted per instance at batch 1 with tokens and heads removed, whatever ``--inference``."""


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint: accuracy, mean GMACs per instance (full vs trimmed), keep ratios",
                       description=DESCRIPTION.replace("``", ""))
    p.add_argument("--checkpoint", required=True, help="a run directory or its checkpoint/ directory")
    p.add_argument("--split", default=None, help="dataset split to evaluate (default: data.eval_split of the run)")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="evaluate on another dataset: a YAML/JSON file with a `data` section (or the section "
                        "itself) as in an experiment config, e.g. NoCaps for a COCO-trained captioner (zero-shot); "
                        "the model is the checkpoint's, the task is that dataset's")
    p.add_argument("--instances", type=positive_int, default=None, metavar="N",
                   help="evaluate on the first N >= 1 examples (default: all)")
    p.add_argument("--macs-instances", type=nonneg_int, default=None, metavar="M",
                   help="instances whose MACs are counted at batch 1, >= 0; 0: no MACs "
                        "(default: train.macs_instances of the run)")
    p.add_argument("--batch-size", type=positive_int, default=None, metavar="B",
                   help="evaluation batch size, >= 1 (default: train.eval_batch_size of the run)")
    p.add_argument("--inference", choices=INFERENCE, default=None,
                   help="how a trimmed model runs eval batches larger than 1 (default: remove, the model's "
                        "default: such batches run masked, no compute saved; packed: kept tokens only)")
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="where to evaluate: cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--output", default=None, metavar="FILE",
                   help="also write the metrics as JSON to FILE (written atomically)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=run)


def describe_inference(mode: str | None, batch_size: int, n: int) -> str:
    """What ``mode`` (None: an untrimmed model) did with ``n`` examples in eval batches of
    ``batch_size``, in words, for the output."""
    if mode is None:
        return "full model (no trimmers)"
    if mode == "hard":
        return "hard (every batch masked: nothing removed, no compute saved)"
    if batch_size == 1 or n <= 1:
        return f"{mode} (batch 1: tokens and heads removed)"
    what = {
        "remove": f"batches of {batch_size} run masked, as mode hard: the same outputs as removal, no compute "
                  f"saved; --inference packed runs only the kept tokens",
        "packed": f"batches of {batch_size} packed: only the kept tokens of the batch, in one row matrix",
        "padded": f"batches of {batch_size} on the kept tokens, padded to the most kept in the batch",
    }[mode]
    if n % batch_size == 1:
        what += "; the last batch, of 1, with tokens and heads removed"
    return f"{mode} ({what})"


def read_data_config(path: str):
    """``--data FILE``: a :class:`~trimkit_train.DataConfig` from a YAML/JSON file holding a ``data``
    section (an experiment config) or the section alone; errors name the file and field."""
    from pathlib import Path

    import yaml
    from pydantic import ValidationError

    from trimkit_train import ConfigError, DataConfig

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--data {path}: no such file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"--data {path}: not a YAML/JSON file ({type(err).__name__}: {err})") from None
    if isinstance(raw, dict) and isinstance(raw.get("data"), dict):
        raw = raw["data"]
    if not isinstance(raw, dict):
        raise ConfigError(f"--data {path}: expected a mapping (a `data` section), got {type(raw).__name__}")
    try:
        data = DataConfig.model_validate(raw)
    except ValidationError as err:
        lines = [f"  data.{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"--data {path}: invalid data section:\n" + "\n".join(lines)) from None
    if "eval_size" not in data.model_fields_set:  # the whole split unless the file says otherwise
        data = data.model_copy(update={"eval_size": None})
    return data


def resolve_device(name: str | None):
    """``--device``: the torch device to evaluate on; a CUDA device that is not there is an error."""
    import torch

    from trimkit.cli import UsageError

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r}: not a torch device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine (torch "
                             f"{torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UsageError(f"--device {name!r}: only cpu and cuda are supported")
    return device


def run(args) -> int:
    from trimkit import TrimmedModel
    from trimkit_train import build_dataset, evaluate, load_checkpoint, task_of

    try:
        from trimkit.model import MaskedBatchWarning
    except ImportError:  # an older core without the warning
        MaskedBatchWarning = None

    import torch

    device = resolve_device(args.device)
    model, config = load_checkpoint(args.checkpoint)
    model.to(device)
    data = config.data if args.data is None else read_data_config(args.data)
    if args.split is not None:
        data = data.model_copy(update={"eval_split": args.split})
    dataset = build_dataset(data, "eval")
    if len(dataset) == 0:  # else the accuracy would read 0.0
        raise ValueError(f"split {data.eval_split!r} of {args.checkpoint} has no examples to evaluate")
    trimmed = isinstance(model, TrimmedModel)
    notes = []
    if trimmed:
        if args.inference is not None:
            model.inference = args.inference
        mode = model.inference
    else:
        mode = None
        if args.inference is not None:
            notes.append(f"--inference {args.inference} ignored: {args.checkpoint} holds a plain backbone "
                         f"(no trimmers)")
    batch_size = config.train.eval_batch_size if args.batch_size is None else args.batch_size
    macs_n = config.train.macs_instances if args.macs_instances is None else args.macs_instances
    if args.instances is not None and args.instances > len(dataset):
        notes.append(f"--instances {args.instances}: split {data.eval_split!r} has {len(dataset)} examples; "
                     f"evaluating all of them")
    if macs_n and macs_n > len(dataset):
        notes.append(f"--macs-instances {macs_n}: split {data.eval_split!r} has {len(dataset)} examples; "
                     f"counting MACs on all of them")
    with warnings.catch_warnings():
        if MaskedBatchWarning is not None:  # the output below says how the batches ran, and names --inference
            warnings.simplefilter("ignore", MaskedBatchWarning)
        ev = evaluate(model, dataset, batch_size=batch_size, instances=args.instances, macs_instances=macs_n,
                      device=device, task=task_of(data, dataset))
    ev.update(checkpoint=str(args.checkpoint), split=data.eval_split, trimmed=config.trim is not None,
              inference=mode, eval_batch_size=batch_size, device=str(device),
              inference_note=describe_inference(mode, batch_size, ev["n"]))
    if args.output is not None:
        from trimkit.checkpoint import atomic_write_bytes

        atomic_write_bytes(args.output, (json.dumps(ev, indent=2) + "\n").encode())
    for note in notes:
        print(f"trimkit eval: note: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(ev, indent=2))
        return 0
    print(f"checkpoint   {args.checkpoint}  (split {data.eval_split}, {ev['n']} examples)")
    skip = {"n", "task", "main_metric", "keep", "keep_tokens", "keep_heads", "gmacs", "gmacs_full", "macs_ratio",
            "macs_instances", "checkpoint", "split", "trimmed", "inference", "eval_batch_size", "device",
            "inference_note"}
    metrics = {k: v for k, v in ev.items() if k not in skip and isinstance(v, (int, float))}
    main = ev["main_metric"]
    print(f"task         {ev['task']}  ({main} {ev[main]:.4f})")
    for k, v in metrics.items():
        print(f"  {k:<11} {v:.4f}")
    print(f"inference    {ev['inference_note']}")
    if "gmacs" in ev:
        ratio = ev["macs_ratio"]
        fewer = (f"{ratio:.2f}x fewer" if not ratio < 1 else  # nan stays "nan x fewer"
                 f"{1 / ratio:.2f}x more: the trimmers cost more than they removed")
        print(f"GMACs/inst.  full {ev['gmacs_full']:.4f}  trimmed {ev['gmacs']:.4f}  "
              f"({fewer}; {ev['macs_instances']} instances at batch 1, tokens and heads removed)")
    else:
        print("GMACs/inst.  not counted (--macs-instances 0)" if args.macs_instances == 0
              else "GMACs/inst.  not counted (train.macs_instances of the run is 0; pass --macs-instances M)")
    if ev["keep"]:
        print(f"keep ratio   tokens {ev['keep_tokens']:.3f}  heads {ev['keep_heads']:.3f}")
        width = max(len(k) for k in ev["keep"])
        for k, v in ev["keep"].items():
            print(f"  {k:<{width}}  {v:.3f}")
    return 0
