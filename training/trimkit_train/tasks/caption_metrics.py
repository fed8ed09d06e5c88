"""BLEU and CIDEr for captions, with pycocoevalcap's ``Bleu`` and ``Cider`` scorers.

pycocoevalcap's own ``PTBTokenizer`` runs Stanford CoreNLP (Java); here captions are tokenised by
:func:`tokenize_caption` instead: lower-cased, split into runs of letters and digits, an apostrophe
starting a new token (``"dog's"`` -> ``dog 's``), every other character a separator (so
punctuation is dropped, as the PTB tokenisation step of the COCO evaluation drops it). Scores can
differ slightly from the official COCO evaluation where the two tokenisations differ (e.g.
``"don't"``: PTB ``do n't``, here ``don 't``).
"""

from __future__ import annotations

import re
from typing import Sequence

__all__ = ["caption_scores", "tokenize_caption"]

_TOKEN = re.compile(r"'?[^\W_]+")


def tokenize_caption(text: str) -> list[str]:
    """The tokens of a caption (see the module docstring)."""
    return _TOKEN.findall(text.lower())


def caption_scores(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-1..4 (``bleu1`` .. ``bleu4``, pycocoevalcap's "closest" reference length) and
    CIDEr-D (``cider``, document frequencies from these references) of ``hypotheses[i]`` against
    ``references[i]`` (one or more strings each)."""
    from .._extras import require_extras

    require_extras("pycocoevalcap", feature="BLEU / CIDEr")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if any(len(r) == 0 for r in references):
        raise ValueError("every hypothesis needs at least one reference")
    gts = {i: [" ".join(tokenize_caption(r)) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(tokenize_caption(h))] for i, h in enumerate(hypotheses)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    out = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}
    out["cider"] = float(cider)
    return out
