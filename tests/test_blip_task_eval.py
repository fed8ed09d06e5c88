"""BLIP's released evaluation protocols through trimkit_train's evaluation (tiny random BLIP models
fitted to the sample task files, plain and trimmed).

The fears: answer ranking that is not the likelihood argmax it claims to be (or reads question
tokens the trimmers dropped); "generated" metrics that are really the teacher-forced proxy;
ITC+ITM reranking that disagrees with plain ITM ranking when nothing is cut; a protocol that the
trainer's ``evaluate`` / ``trimkit eval`` never reaches.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import trimkit
from conftest import randomize_trimmers
from trimkit import TrimConfig
from trimkit.adapter import DatasetFacts
from trimkit.plugins import get_registry

transformers = pytest.importorskip("transformers")

from trimkit_blip.generation import unwrapped  # noqa: E402
from trimkit_train import evaluate  # noqa: E402
from trimkit_train.data import KarpathyCaptioning, KarpathyRetrieval, NoCapsCaptioning, VQAv2Dataset  # noqa: E402
from trimkit_train.tasks import (CaptionMetric, CaptioningTask, VQAMetric, VQATask, caption_scores,  # noqa: E402
                                 evaluate_retrieval, get_task)

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).parent / "data" / "tasks"
ANSWERS = ["white", "gray", "2", "3", "yes", "no", "laptop", "a laptop computer"]
FLICKR = DATA / "karpathy" / "dataset_flickr30k.json"
NOCAPS = DATA / "nocaps" / "nocaps_val_4500_captions.json"
KINDS = ["plain", "trimmed"]


@pytest.fixture(scope="module")
def adapter():
    return get_registry().adapters.get("blip")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A BERT WordPiece tokenizer holding every word of the sample files, and noise images for them."""
    from PIL import Image
    from transformers import BertTokenizerFast

    tmp = tmp_path_factory.mktemp("blip_eval")
    words = {"a", "picture", "of", "computer"}
    for f in DATA.rglob("*.json*"):
        words |= set(re.findall(r"[a-z]+", f.read_text().lower()))
    tok = tmp / "tok"
    tok.mkdir()
    (tok / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words),
                                              *".,?!'-0123456789"]) + "\n")
    BertTokenizerFast(str(tok / "vocab.txt")).save_pretrained(str(tok))
    rng = np.random.default_rng(0)

    def image(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)

    vqa = tmp / "vqa"
    shutil.copytree(DATA / "vqa", vqa)
    for image_set, iid in [("train2014", 42), ("train2014", 7), ("val2014", 3)]:
        image(vqa / image_set / f"COCO_{image_set}_{iid:012d}.jpg")
    flickr = tmp / "flickr"
    for img in json.loads(FLICKR.read_text())["images"]:
        image(flickr / img["filename"])
    nocaps = tmp / "nocaps" / "val"
    for img in json.loads(NOCAPS.read_text())["images"]:
        image(nocaps / img["file_name"])
    return {"tok": str(tok), "vqa": str(vqa), "flickr": str(flickr), "nocaps": str(nocaps)}


@pytest.fixture(scope="module")
def data(files):
    common = {"tokenizer": files["tok"], "image_size": 32}
    return {
        "vqa": VQAv2Dataset("train+val", root=files["vqa"], answers=ANSWERS, skip_unanswerable=False, **common),
        "caption": KarpathyCaptioning("test", annotations=str(FLICKR), images=files["flickr"], **common),
        "itm": KarpathyRetrieval("test", annotations=str(FLICKR), images=files["flickr"], **common),
        "nocaps": NoCapsCaptioning("val", annotations=str(NOCAPS), images=files["nocaps"], **common),
    }


def _trimmed(model, seed: int = 3) -> trimkit.TrimmedModel:
    tmodel = trimkit.trim(model, TrimConfig(token_target=0.5)).eval()
    randomize_trimmers(tmodel, seed)  # about half the tokens kept, differently per instance
    return tmodel


@pytest.fixture(scope="module")
def models(adapter, data):
    """Per task: the plain wrapper (sized for the data by the adapter's dataset_overrides) and a trimmed copy."""
    out = {}
    for task, ds in data.items():
        if task == "nocaps":
            continue
        options = adapter.dataset_overrides(DatasetFacts.of(ds))
        if task == "vqa":  # the answer decoder, not the classifier the overrides pick for a trainer run
            options.update(task="vqa")
            options.pop("num_labels")
        plain = adapter.build("tiny", seed=1, **options)
        out[task] = {"plain": plain, "trimmed": _trimmed(plain)}
    return out


def _dropped(tmodel) -> bool:
    return any(float(r.keep.float().mean()) < 1 for r in tmodel.records if r.kind == "token")


# --- VQA: answer ranking ---------------------------------------------------------------------------------------
def _questions(adapter, model, batch=3, seed=5):
    """Random images and questions, rows after the first padded."""
    x = adapter.example_inputs(unwrapped(model), batch_size=batch, seed=seed)
    return x["pixel_values"], x["input_ids"], x["attention_mask"]


def _candidates(model, data):
    from trimkit_blip import answer_candidates

    bos = unwrapped(model).config.text_config.bos_token_id
    return answer_candidates(data["vqa"].tokenizer, ANSWERS, bos)


@pytest.mark.parametrize("kind", KINDS)
def test_ranking_with_every_candidate_is_the_likelihood_argmax(adapter, models, data, kind):
    """k = A: the scores are each candidate's log-likelihood under the wrapper's own forward (K = A
    answers per question), so the ranked answer is the brute-force argmax. The ranking's decoder
    ignores question padding (BLIP's encoder_attention_mask), so the forward gets each question
    unpadded. Trimmed: batch 1 with the dropped question tokens removed (the only way the forward
    takes K > 1); a masked batch of 3 padded questions ranks as each question alone."""
    from trimkit_blip import rank_answers

    model = models["vqa"][kind]
    cand, cmask = _candidates(model, data)
    num = cand.shape[0]
    assert (cmask[:, -1] == 0).any() and cmask[-1].all()  # padded to the longest answer
    px, ids, mask = _questions(adapter, model)
    assert (mask == 0).any()
    batch_scores = rank_answers(model, px, ids, mask, cand, cmask, k=num)
    for b in range(3):
        one = (px[b:b + 1], ids[b:b + 1], mask[b:b + 1])
        real = int(mask[b].sum())
        unpadded = (px[b:b + 1], ids[b:b + 1, :real], mask[b:b + 1, :real])
        with torch.no_grad():
            if kind == "trimmed":
                with model.mode("remove"):
                    brute = model(*unpadded, cand, cmask)
                    ranked = rank_answers(model, *one, cand, cmask, k=num)
                assert _dropped(model), "no question/image token dropped: the comparison would be vacuous"
            else:
                brute = model(*unpadded, cand, cmask)
                ranked = rank_answers(model, *one, cand, cmask, k=num)
        assert brute.shape == ranked.shape == (1, num)
        torch.testing.assert_close(ranked, brute, atol=1e-4, rtol=0)
        torch.testing.assert_close(batch_scores[b:b + 1], ranked, atol=1e-4, rtol=0)
        assert int(ranked.argmax()) == int(brute.argmax())


@pytest.mark.parametrize("kind", KINDS)
def test_ranking_scores_only_the_top_k_first_tokens(adapter, models, data, kind):
    from trimkit_blip import rank_answers

    model = models["vqa"][kind]
    wrapper = unwrapped(model)
    cand, cmask = _candidates(model, data)
    px, ids, mask = _questions(adapter, model, seed=9)
    k = 3
    scores = rank_answers(model, px, ids, mask, cand, cmask, k=k)
    assert scores.shape == (3, len(ANSWERS))
    assert (torch.isfinite(scores).sum(1) == k).all()
    best = scores.argmax(1)
    assert torch.isfinite(scores.gather(1, best[:, None])).all()  # the answer is one of the candidates
    # the k finite ones are the candidates whose first token is most probable after BOS
    from trimkit_blip.generation import cross_attention_mask, encoder_states

    states, keep = encoder_states(model, px, ids, mask)
    bos = torch.full((3, 1), int(cand[0, 0]))
    with torch.no_grad(), cross_attention_mask(wrapper.text_decoder, keep):
        first = wrapper.text_decoder(input_ids=bos, encoder_hidden_states=states, use_cache=False).logits[:, 0]
    prob = first.softmax(-1)[:, cand[:, 1]]
    for b in range(3):
        kth = prob[b].topk(k).values[-1]
        assert set(torch.isfinite(scores[b]).nonzero().flatten().tolist()) == \
            set((prob[b] >= kth).nonzero().flatten().tolist())


def test_ranking_with_label_smoothing_is_blips_loss(adapter, models, data):
    """label_smoothing=0.1: the score is minus the decoder's own label-smoothed loss (what BLIP's
    released rank_answer computes with its training loss)."""
    from trimkit_blip import rank_answers
    from trimkit_blip.generation import encoder_states

    model = models["vqa"]["plain"]
    cand, cmask = _candidates(model, data)
    px, ids, mask = _questions(adapter, model, batch=1)
    scores = rank_answers(model, px, ids, mask, cand, cmask, k=len(ANSWERS), label_smoothing=0.1)
    states, _ = encoder_states(model, px, ids, mask)
    decoder = copy.deepcopy(model.text_decoder)
    decoder.label_smoothing = 0.1
    with torch.no_grad():
        loss = decoder(input_ids=cand, attention_mask=cmask, encoder_hidden_states=states.expand(len(ANSWERS), -1, -1),
                       labels=cand.masked_fill(cmask == 0, -100), reduction="none").loss
    torch.testing.assert_close(scores[0], -loss, atol=1e-4, rtol=0)


# --- VQA: evaluation through the trainer's evaluate -----------------------------------------------------------
def test_vqa_metric_scores_generated_answers():
    scores = torch.zeros(3, len(ANSWERS))
    scores[0, ANSWERS.index("laptop")] = 1.0
    scores[1, ANSWERS.index("2")] = 0.6
    scores[1, ANSWERS.index("3")] = 0.9
    scores[2, ANSWERS.index("yes")] = 1.0
    metric = VQAMetric(ANSWERS)
    metric.update(None, {"labels": scores, "generated": ["A Laptop.", "two", "zebra"]})  # normalised: laptop, 2
    got = metric.compute()
    assert got["vqa_score"] == pytest.approx((1.0 + 0.6 + 0.0) / 3)
    assert got["accuracy"] == pytest.approx(1 / 3)  # "2" scores, but 3 was the most common answer
    with pytest.raises(ValueError, match="vocabulary"):
        VQAMetric().update(None, {"labels": scores, "generated": ["yes"] * 3})


@pytest.mark.parametrize("kind", KINDS)
def test_vqa_evaluation_ranks_the_answer_list(models, data, kind):
    """evaluate() with the vqa task: BLIP's decoder ranks the dataset's answers (the ranking's
    argmax scored by VQAMetric), MACs counted on the forward with k candidates."""
    from trimkit_blip import answer_candidates, rank_answers

    model, ds = models["vqa"][kind], data["vqa"]
    ev = evaluate(model, ds, batch_size=4, macs_instances=1, task=VQATask(k_test=4))
    assert ev["task"] == "vqa" and ev["n"] == len(ds) and ev["gmacs"] > 0
    metric = VQAMetric(ANSWERS)
    cand = answer_candidates(ds.tokenizer, ANSWERS, unwrapped(model).config.text_config.bos_token_id)
    for start in range(0, len(ds), 4):
        batch = ds.collate_fn([ds[i] for i in range(start, min(len(ds), start + 4))])
        metric.update(rank_answers(model, batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                                   *cand, k=4), batch)
    assert ev["vqa_score"] == pytest.approx(metric.compute()["vqa_score"])
    if kind == "trimmed":
        assert ev["keep_tokens"] < 1 and any(k.startswith("text_encoder") for k in ev["keep"])


@pytest.mark.parametrize("kind", KINDS)
def test_vqa_evaluation_by_generation(models, data, kind):
    """vqa_generate: the generated answer is what is scored. The decoder is made to answer
    "laptop" (one new token, its output bias raised), so the score is that answer's soft score."""
    ds = data["vqa"]
    plain = copy.deepcopy(models["vqa"]["plain"])
    laptop = ds.tokenizer.convert_tokens_to_ids("laptop")
    with torch.no_grad():
        plain.text_decoder.cls.predictions.bias[laptop] += 100.0
    model = _trimmed(plain) if kind == "trimmed" else plain
    task = VQATask("vqa_generate", inference="generate", generation={"max_length": 2})
    ev = evaluate(model, ds, batch_size=4, macs_instances=1, task=task)
    want = float(torch.stack([ds.scores(i)[ANSWERS.index("laptop")] for i in range(len(ds))]).mean())
    assert want > 0 and ev["vqa_score"] == pytest.approx(want)
    assert ev["task"] == "vqa_generate" and ev["gmacs"] > 0


# --- captioning ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_generated_captions_reach_the_caption_metric(models, data, kind, monkeypatch):
    """The captioning task's evaluation scores captions generated through trimkit_blip's generate
    (the decoder reading only the kept image tokens): BLEU/CIDEr equal those of the generated
    captions, differ from the teacher-forced proxy's hypotheses, and the decoding options reach
    the decoder (greedy or beam search)."""
    from trimkit_blip import generate_captions
    from trimkit_blip.evaluation import CaptionEvaluator

    model, ds = models["caption"][kind], data["caption"]
    wrapper = unwrapped(model)
    seen = []
    original = wrapper.text_decoder.generate

    def spy(*args, **kwargs):
        seen.append({k: kwargs[k] for k in ("num_beams", "max_length", "min_length") if k in kwargs})
        return original(*args, **kwargs)

    monkeypatch.setattr(wrapper.text_decoder, "generate", spy)
    for name, beams in [("captioning", 3), ("captioning_greedy", 1)]:
        seen.clear()
        ev = evaluate(model, ds, batch_size=2, macs_instances=0, task=get_task(name))
        assert seen and all(s == {"num_beams": beams, "max_length": 20, "min_length": 5} for s in seen)
        refs, hyps = [], []
        for start in range(0, len(ds), 2):
            batch = ds.collate_fn([ds[i] for i in range(start, min(len(ds), start + 2))])
            seq = generate_captions(model, batch["pixel_values"], ds.prompt_ids(), num_beams=beams)
            metric = CaptionMetric(ds.tokenizer, ds.prompt)
            metric.update(None, {**batch, "generated": seq})
            hyps += metric.hypotheses
            refs += batch["references"]
        assert {k: ev[k] for k in ("bleu4", "cider")} == pytest.approx(
            {k: v for k, v in caption_scores(refs, hyps).items() if k in ("bleu4", "cider")})
        if kind == "trimmed":
            assert _dropped(model) and ev["keep_tokens"] < 1
    # the proxy path (no generation) scores other hypotheses: the teacher-forced argmax
    batch = ds.collate_fn([ds[i] for i in range(len(ds))])
    gen, proxy = CaptionMetric(ds.tokenizer, ds.prompt), CaptionMetric(ds.tokenizer, ds.prompt)
    CaptionEvaluator(model, ds, {"num_beams": 1})(batch)
    gen.update(None, batch)
    with torch.no_grad():
        logits = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"])
    proxy.update(logits, {k: v for k, v in batch.items() if k != "generated"})
    assert gen.hypotheses != proxy.hypotheses
    assert all(not h.startswith(ds.prompt.strip()) for h in gen.hypotheses)  # the prompt is not scored
    ev_proxy = evaluate(model, ds, batch_size=2, macs_instances=0, task=CaptioningTask(generation=None))
    assert ev_proxy["cider"] == pytest.approx(caption_scores(batch["references"], proxy.hypotheses)["cider"])


# --- NoCaps -----------------------------------------------------------------------------------------------------
def test_nocaps_reader(files, data, tmp_path):
    from trimkit_train import DataConfig, build_dataset

    ds = data["nocaps"]
    assert len(ds) == 4 and ds.task == "captioning" and ds.variant == "captioning" and ds.num_labels is None
    assert ds.image_ids == [0, 1, 2, 3] and ds.domains == ["in-domain", "near-domain", "out-domain", "near-domain"]
    assert ds.references[0] == ["A baby is standing in front of a house.", "A little girl in a white jacket and sandals.",
                                "The young child stands near the door of a home."]  # every caption of image 0
    assert ds.captions[0] == "a baby is standing in front of a house"  # cleaned as BLIP
    item = ds[2]
    assert item["pixel_values"].shape == (3, 32, 32) and item["domain"] == "out-domain" and item["image_id"] == 2
    assert (item["labels"][:ds.prompt_length] == -100).all() and (item["labels"][ds.prompt_length:] >= 0).all()
    assert ds.tokenizer.decode(ds.prompt_ids(), skip_special_tokens=True) == "a picture of"
    assert ds.generation == {"repetition_penalty": 1.1}  # BLIP's NoCaps decoding
    batch = ds.collate_fn([ds[0], ds[1]])
    assert batch["domain"] == ["in-domain", "near-domain"] and len(batch["references"]) == 2
    # registered; the released layout under root (nocaps_val_4500_captions.json, val/)
    root = tmp_path / "nocaps"
    shutil.copytree(Path(files["nocaps"]), root / "val")
    shutil.copy(NOCAPS, root / "nocaps_val_4500_captions.json")
    cfg = DataConfig(name="nocaps", options={"root": str(root), "tokenizer": files["tok"], "image_size": 32,
                                             "domain": "near-domain"}, eval_split="val", eval_size=None)
    near = build_dataset(cfg, "eval")
    assert isinstance(near, NoCapsCaptioning) and near.image_ids == [1, 3]
    with pytest.raises(ValueError, match="unknown domain"):
        NoCapsCaptioning("val", root=str(root), tokenizer=files["tok"], domain="outer-space")
    test = tmp_path / "nocaps_test_image_info.json"
    test.write_text(json.dumps({"images": json.loads(NOCAPS.read_text())["images"]}))
    with pytest.raises(ValueError, match="EvalAI"):
        NoCapsCaptioning("test", annotations=str(test), images=str(root / "val"), tokenizer=files["tok"])


@pytest.mark.parametrize("kind", KINDS)
def test_zero_shot_nocaps_evaluation_of_a_coco_captioner(models, data, kind, monkeypatch):
    """The captioner built for the Karpathy captioning data evaluates on NoCaps: generated captions,
    CIDEr overall and per domain, BLIP's NoCaps repetition penalty reaching the decoder."""
    model = models["caption"][kind]
    wrapper = unwrapped(model)
    seen = []
    original = wrapper.text_decoder.generate
    monkeypatch.setattr(wrapper.text_decoder, "generate",
                        lambda *a, **kw: seen.append(kw.get("repetition_penalty")) or original(*a, **kw))
    ev = evaluate(model, data["nocaps"], batch_size=2, macs_instances=1)
    assert ev["task"] == "captioning" and ev["n"] == 4 and seen and set(seen) == {1.1}
    assert {"cider", "bleu4", "cider_in_domain", "cider_near_domain", "cider_out_domain"} <= set(ev)


# --- retrieval ---------------------------------------------------------------------------------------------------
def test_itc_embeddings_are_transformers_contrastive_path(adapter, models):
    from transformers import BlipForImageTextRetrieval

    model = models["itm"]["plain"]
    blip = BlipForImageTextRetrieval(model.config).eval()
    blip.load_state_dict(model.state_dict(), strict=False)
    x = adapter.example_inputs(model, batch_size=3, seed=2)
    with torch.no_grad():
        theirs = blip(**x, use_itm_head=False).itm_score
        ours = model.itc_similarity(**x)
        itm = model(**x)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert itm.shape == (3, 2)  # the forward still returns the ITM logits
    emb = model.image_embeddings(x["pixel_values"])
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)
    assert not model.vision_proj.weight.requires_grad and not model.text_proj.weight.requires_grad


def _full_itm(model, ds, itm="match"):
    """Every pair scored by the model's ITM forward (trimmed for a TrimmedModel): the reference."""
    def score(batch):
        with torch.no_grad():
            logits = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"])
        return logits[:, 1] if itm == "match" else logits[:, 1] - logits[:, 0]

    return evaluate_retrieval(score, ds, None, batch_size=4, return_scores=True)


@pytest.mark.parametrize("kind", KINDS)
def test_itc_itm_rerank_with_k_all_is_full_itm_ranking(models, data, kind):
    from trimkit_blip import evaluate_blip_retrieval

    model, ds = models["itm"][kind], data["itm"]
    everything = max(ds.num_images, ds.num_texts)
    full = _full_itm(model, ds)
    rerank = evaluate_blip_retrieval(model, ds, k=everything, batch_size=4, add_itc=False, return_scores=True)
    for key in ("scores_i2t", "scores_t2i"):
        torch.testing.assert_close(rerank[key], full["scores_i2t"], atol=1e-4, rtol=0)
    recalls = [k for k in full if k.startswith(("i2t_", "t2i_", "r_mean"))]
    assert {k: rerank[k] for k in recalls} == {k: full[k] for k in recalls}
    assert rerank["n"] == ds.num_images * ds.num_texts and rerank["pairs_scored"] == 2 * ds.num_images * ds.num_texts
    # BLIP's score: ITM match logit + ITC similarity
    with torch.no_grad():
        px = torch.stack([ds.image(i) for i in range(ds.num_images)])
        texts = ds.collate_fn([{"input_ids": ds.input_ids[t]} for t in range(ds.num_texts)])
        itc = unwrapped(model).itc_similarity(px, texts["input_ids"], texts["attention_mask"]).double()
    blip = evaluate_blip_retrieval(model, ds, k=everything, batch_size=4, return_scores=True)
    torch.testing.assert_close(blip["scores_i2t"], full["scores_i2t"] + itc, atol=1e-4, rtol=0)
    if kind == "trimmed":
        assert blip["keep"] and min(blip["keep"].values()) < 1  # the ITM forwards ran trimmed


@pytest.mark.parametrize("kind", KINDS)
def test_rerank_scores_only_the_itc_top_k(models, data, kind):
    from trimkit_blip import evaluate_blip_retrieval

    model, ds = models["itm"][kind], data["itm"]
    out = evaluate_blip_retrieval(model, ds, k=2, batch_size=4, return_scores=True)
    assert (torch.isfinite(out["scores_i2t"]).sum(1) == 2).all()
    assert (torch.isfinite(out["scores_t2i"]).sum(0) == 2).all()
    assert out["pairs_scored"] == 2 * (ds.num_images + ds.num_texts)
    assert 0 <= out["r_mean"] <= 1
    sub = evaluate_blip_retrieval(model, ds, k=2, batch_size=4, instances=ds.num_texts + 1)  # 2 images, their texts
    assert sub["n"] == 2 * 5


@pytest.mark.parametrize("kind", KINDS)
def test_trainer_evaluate_runs_blips_retrieval_protocol(models, data, kind):
    model, ds = models["itm"][kind], data["itm"]
    ev = evaluate(model, ds, batch_size=4, macs_instances=1)  # the dataset's task: retrieval (k_test 128)
    assert ev["task"] == "retrieval" and ev["pairs_scored"] == 2 * ds.num_images * ds.num_texts
    assert ev["n"] == len(ds) and ev["gmacs"] > 0
    from trimkit_blip import evaluate_blip_retrieval

    want = evaluate_blip_retrieval(model, ds, k=128, batch_size=4)
    assert ev["r_mean"] == pytest.approx(want["r_mean"])
    if kind == "trimmed":
        assert ev["keep"] == pytest.approx(want["keep"]) and ev["keep_tokens"] < 1


def test_trimkit_eval_on_a_blip_retrieval_checkpoint(files, tmp_path, capsys):
    """A BLIP run on Karpathy retrieval (the adapter maps the dataset to its ITM model) and
    `trimkit eval` on its checkpoint: BLIP's ITC + ITM protocol."""
    from trimkit.cli import main
    from trimkit_train import ExperimentConfig, Trainer

    config = ExperimentConfig.from_dict({
        "model": {"adapter": "blip", "size": "tiny"},
        "data": {"name": "karpathy_retrieval", "options": {"annotations": str(FLICKR), "images": files["flickr"],
                                                             "tokenizer": files["tok"], "image_size": 32},
                 "train_split": "train", "eval_split": "test", "train_size": None, "eval_size": None},
        "train": {"steps": 1, "batch_size": 2, "eval_batch_size": 4, "macs_instances": 1, "progress": False,
                  "out_dir": str(tmp_path / "run")},
        "trim": {"token_target": 0.5},
    })
    trainer = Trainer(config)
    assert type(trainer.tmodel.model).__name__ == "BlipITMForTrimming"
    metrics = trainer.fit()
    assert metrics["pairs_scored"] > 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--json", "--macs-instances", "0"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["task"] == "retrieval" and ev["pairs_scored"] == 2 * 3 * 6 and ev["r_mean"] == pytest.approx(
        metrics["r_mean"])


# --- the adapter's dataset mapping ------------------------------------------------------------------------------
def test_dataset_overrides_map_task_variants(adapter, data):
    from trimkit_train.data import DigitGridDataset

    task = {name: adapter.dataset_overrides(DatasetFacts.of(ds)).get("task") for name, ds in data.items()}
    assert task == {"vqa": "vqa_classifier", "caption": "caption", "itm": "itm", "nocaps": "caption"}
    assert adapter.dataset_overrides(DatasetFacts(variant="retrieval"))["task"] == "itm"
    with pytest.raises(ValueError, match="2 classes"):
        adapter.dataset_overrides(DatasetFacts(variant="itm", num_labels=3))
    grid = DigitGridDataset("train", size=2, seed=0, grid=2, digits_per_image=(1, 3))
    assert adapter.dataset_overrides(DatasetFacts.of(grid))["task"] == "vqa_classifier"
    built = adapter.build("tiny", **adapter.dataset_overrides(DatasetFacts.of(data["caption"])))
    assert type(built).__name__ == "BlipCaptionForTrimming"


def test_decoding_protocols_run_a_packed_model_masked(adapter, models, data):
    """`--inference packed`: BLIP's forward holds a causal decoder the packed engine does not take, so
    the encoder pass of ranking / generation runs masked (the same scores) and the setting is restored."""
    from trimkit_blip import generate_captions, rank_answers

    model = models["vqa"]["trimmed"]
    cand, cmask = _candidates(model, data)
    px, ids, mask = _questions(adapter, model, seed=11)
    masked = rank_answers(model, px, ids, mask, cand, cmask, k=4)
    model.inference = "packed"
    try:
        torch.testing.assert_close(rank_answers(model, px, ids, mask, cand, cmask, k=4), masked, atol=1e-5, rtol=0)
        assert model.inference == "packed"
    finally:
        model.inference = "remove"
    cap, ds = models["caption"]["trimmed"], data["caption"]
    batch = ds.collate_fn([ds[i] for i in range(len(ds))])
    want = generate_captions(cap, batch["pixel_values"], ds.prompt_ids(), num_beams=1)
    cap.inference = "packed"
    try:
        assert torch.equal(generate_captions(cap, batch["pixel_values"], ds.prompt_ids(), num_beams=1), want)
    finally:
        cap.inference = "remove"
