import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))


def _register_toy():
    """The global registry with the test's ToyAdapter registered as 'toy' (a third party's adapter)."""
    from toyvlm import ToyAdapter

    from trimkit.plugins import get_registry

    registry = get_registry()
    registry.adapters.register("toy", ToyAdapter(), replace=True)
    return registry


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests (threads only add contention there);
    use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize_trimmers(tmodel, seed: int) -> None:
    """Random trimmer weights (std 1), zero biases: decisions then depend on each token (about
    half kept per instance, different across instances) instead of one shared bias keeping all or
    none. Import it as ``from conftest import randomize_trimmers``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tmodel.trimmers.parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=1.0, generator=gen)
            else:
                torch.nn.init.zeros_(p)


class TensorItems:
    """A batch dict ``{name: (B, ...) tensor}`` as a dataset of ``B`` items with its own collate
    (what ``trimkit_train``'s evaluation helpers take). Import it from conftest."""

    def __init__(self, batch: dict) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return next(iter(self.batch.values())).shape[0]

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.batch.items()}

    def collate_fn(self, items: list) -> dict:
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}


@pytest.fixture
def toy_registry():
    return _register_toy()


@pytest.fixture(scope="module")
def toy_registry_module():
    return _register_toy()


def shorter_rows(batch: int, length: int, step: int = 1) -> torch.Tensor:
    """A (batch, length) padding mask (1 = real): row 0 full, row b shorter by ``b * step``, so a
    batch has padding and different real lengths per instance. Import it from conftest."""
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(1, batch):
        mask[b, max(1, length - b * step):] = 0
    return mask


TASK_DATA = Path(__file__).parent / "data" / "tasks"


@pytest.fixture(scope="module")
def vqa_files(tmp_path_factory):
    """VQA v2 sample files in the official format (questions/annotations json, COCO image names; images
    made here) and a BERT tokenizer over their words: ``(root, tokenizer dir)``."""
    import re
    import shutil

    from PIL import Image

    tmp = tmp_path_factory.mktemp("vqa_task")
    words = set()
    for f in TASK_DATA.rglob("*.json*"):
        words |= set(re.findall(r"[a-z]+", f.read_text().lower()))
    tok = write_bert_tokenizer(tmp / "tok", words)
    root = tmp / "vqa"
    shutil.copytree(TASK_DATA / "vqa", root)
    for image_set, iid in [("train2014", 42), ("train2014", 7), ("val2014", 3)]:
        path = root / image_set / f"COCO_{image_set}_{iid:012d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (iid * 20, 100, 50)).save(path)
    return root, tok


def write_bert_tokenizer(directory: Path, words) -> Path:
    """A BERT word-piece tokenizer saved in ``directory`` whose vocabulary is the special tokens, ``words``
    and punctuation/digits (tests build tokenizers from vocab files, nothing is downloaded)."""
    from transformers import BertTokenizerFast

    directory.mkdir(parents=True)
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words),
                                                    *".,?!'-0123456789"]) + "\n")
    BertTokenizerFast(str(directory / "vocab.txt")).save_pretrained(str(directory))
    return directory
