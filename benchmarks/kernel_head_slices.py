"""Whether slicing a kernel-route attention's projections to the kept heads pays
(``AttentionSpec.head_slices``, the choice behind the llava/qwen2_vl adapters' default).

On the kernel route the module runs itself: without slices its q/k/v/o projections compute every
head and only the attention of the dropped heads is skipped; with slices the declared projections
compute the kept heads' rows (o: their columns) only. This times the two at batch 1 (mode remove)
side by side, with the full model, on transformers' LLaVA (Llama decoder, grouped-query heads) built
from config objects at a few widths, heads trimmed in every decoder layer and tokens not trimmed, so
the difference is the heads' projections alone. The kept heads are forced (``Runtime.forced``):

* ``half, one run``: the first half of the heads (a view of the weights; whole key/value groups dropped);
* ``half, alternating``: every other head (gathered rows; every key/value group keeps some heads, so
  k and v are not sliced at all);
* ``quarter, alternating``: every fourth head.

    python benchmarks/kernel_head_slices.py [--widths 256 1024 2048] [--tokens 600] [--threads 2] [--repeats 20]

Writes ``benchmarks/results/kernel_head_slices.md`` and the ``kernel_head_slices`` section of
``benchmarks/RESULTS.md`` (``--no-write``: print only).
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch

import common

OUT = common.RESULTS.parent / "results"

KEEPS = {"half, one run": lambda h: list(range(h // 2)),
         "half, alternating": lambda h: list(range(0, h, 2)),
         "quarter, alternating": lambda h: list(range(0, h, 4))}


def build(width: int, tokens: int, layers: int):
    """A wrapped random LLaVA: Llama decoder of ``width`` (heads of 64, 4 query heads per key/value head,
    intermediate 2.75x), a tiny CLIP tower whose image makes ``tokens`` image tokens."""
    from trimkit.plugins import get_registry

    llava = get_registry().adapters.get("llava")
    heads = width // 64
    side = int(math.isqrt(tokens))
    text = dict(hidden_size=width, intermediate_size=int(2.75 * width) // 16 * 16, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), max_position_embeddings=4096)
    vision = dict(image_size=side * 8, patch_size=8)
    model = llava.build(text_config=text, vision_config=vision, trim_layers=list(range(layers))).eval()
    return llava, model


def variants(llava, model):
    """The same model trimmed with head slices (the adapter's description) and without."""
    from trimkit import TrimConfig, trim
    from trimkit.plugins import get_registry

    class Unsliced:
        def __getattr__(self, name):
            return getattr(llava, name)

        def describe(self, m):
            spec = llava.describe(m)
            layers = [dataclasses.replace(l, attentions=[dataclasses.replace(a, head_slices=False) for a in l.attentions])
                      for l in spec.layers]
            return dataclasses.replace(spec, layers=layers)

    get_registry().adapters.register("llava-unsliced", Unsliced(), replace=True)
    cfg = TrimConfig(trim_tokens=False, head_target=0.5)
    return trim(model, cfg, adapter="llava").eval(), trim(model, cfg, adapter="llava-unsliced").eval()


def force(tmodels, x: dict, kept: list[int]) -> None:
    """Every head trimmer keeps exactly ``kept``."""
    tmodel = tmodels[0]
    with torch.no_grad(), tmodel.mode("remove"):
        tmodel(**x)
        keys = [(r.key, r.total) for r in tmodel.records if r.kind == "head"]
    for t in tmodels:
        forced = {}
        for key, total in keys:
            logits = torch.full((1, total), -5.0)
            logits[0, kept] = 5.0
            forced[key] = logits
        t.runtime.forced = forced


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--tokens", type=int, default=576, help="image tokens (a square number; plus ~8 text tokens)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from trimkit.engine.timing import interleaved
    from trimkit.macs import count_macs

    rows = []
    for width in args.widths:
        llava, model = build(width, args.tokens, args.layers)
        sliced, unsliced = variants(llava, model)
        x = llava.example_inputs(model, 1, seed=0)
        n = x["input_ids"].shape[1]
        with sliced.full():
            m_full = count_macs(sliced, **x).total
        for name, pick in KEEPS.items():
            kept = pick(width // 64)
            force((sliced, unsliced), x, kept)
            with torch.no_grad(), sliced.mode("remove"), unsliced.mode("remove"):
                a, b = sliced(**x), unsliced(**x)
                err = float((a - b).abs().max())
                m_s, m_u = count_macs(sliced, **x).total, count_macs(unsliced, **x).total

            def run(tm, mode):
                with tm.mode(mode):
                    tm(**x)

            t = interleaved({"full": lambda r: run(sliced, "off"), "unsliced": lambda r: run(unsliced, "remove"),
                             "sliced": lambda r: run(sliced, "remove")}, repeats=args.repeats, warmup=2)
            rows.append([str(width), str(width // 64), str(n), name, f"{m_full / m_u:.2f}x", f"{m_full / m_s:.2f}x",
                         f"{t.ratio('unsliced', 'sliced'):.2f}x", f"{t.ratio('full', 'unsliced'):.2f}x",
                         f"{t.ratio('full', 'sliced'):.2f}x", f"{t.median('sliced') * 1e3:.1f}", f"{err:.1e}"])
            print(" | ".join(rows[-1]), flush=True)
            for tm in (sliced, unsliced):
                tm.runtime.forced = {}
    headers = ["width", "heads", "tokens", "kept heads", "MACs saved, unsliced", "MACs saved, sliced",
               "sliced vs unsliced", "unsliced vs full", "sliced vs full", "sliced ms", "max abs difference"]
    body = (f"### Kernel-route head slices (`AttentionSpec.head_slices`)\n\n"
            f"`{common.command()}` ({common.now()}; {common.machine()}; {common.load()}).\n\n"
            f"LLaVA (Llama decoder, {args.layers} layers, heads of 64, 4 query heads per key/value head), batch 1, "
            "mode remove, heads trimmed in every layer, tokens not trimmed. Speed columns: medians of per-round "
            f"ratios over {args.repeats} interleaved rounds (> 1: the second is faster).\n\n"
            + common.table(headers, rows))
    print(body)
    if not args.no_write:
        OUT.mkdir(exist_ok=True)
        (OUT / "kernel_head_slices.md").write_text(body + "\n")
        common.write_section("kernel_head_slices", body)


if __name__ == "__main__":
    main()
