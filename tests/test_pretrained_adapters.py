"""Pretrained starting points: each adapter's ``from_pretrained`` and ``trimkit.adapter.load_pretrained``.

Everything is offline and tiny: transformers models are saved with ``save_pretrained`` into a
temporary directory (or a fake Hugging Face cache) and loaded back; timm and open_clip weights are
saved to files; METER checkpoints are laid out from METER's own key list
(``tests/data/meter_official_keys.txt``, written from METER's source, not from our model).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from trimkit._compat import ensure_torchvision

ensure_torchvision()

from test_meter_model import (  # noqa: E402
    UNUSED_OFFICIAL,
    meter_symbols,
    official_meter_keys,
    official_meter_state_dict,
)

from trimkit.adapter import (  # noqa: E402
    PretrainedLoadError,
    PretrainedNotFoundError,
    load_pretrained,
    pretrained_adapters,
)

pytestmark = pytest.mark.usefixtures("one_thread")

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache (what huggingface_hub and transformers read at call time)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _cache_repo(cache, repo_id: str, files) -> None:
    """Put ``files`` (paths) into ``cache`` as repo ``repo_id`` at ``main``, laid out as huggingface_hub does."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for f in files:
        shutil.copy(f, snapshot / f.name)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)


# --- the core entry point ------------------------------------------------------------------------
def test_load_pretrained_names_the_adapters_that_can():
    from toyvlm import ToyAdapter

    assert {"blip", "bridgetower", "meter", "open_clip", "timm", "vilt"} <= set(pretrained_adapters())
    with pytest.raises(PretrainedLoadError, match="no from_pretrained") as err:
        load_pretrained(ToyAdapter(), "anything")
    for name in ("blip", "meter", "timm", "vilt"):
        assert name in str(err.value)
    with pytest.raises(KeyError, match="registered"):
        load_pretrained("no-such-adapter", "anything")
    with pytest.raises(TypeError, match="source"):
        load_pretrained("vilt", "")


# --- transformers adapters -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def vilt_dir(tmp_path_factory):
    from trimkit_vilt import ViltAdapter

    model = ViltAdapter().build("tiny", seed=3)
    path = tmp_path_factory.mktemp("vilt")
    model.model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def blip_itm_dir(tmp_path_factory):
    from transformers import BlipForImageTextRetrieval

    from trimkit_blip import BlipAdapter

    config = BlipAdapter().build("tiny", task="itm").config  # the tiny preset's BlipConfig
    torch.manual_seed(4)
    hf = BlipForImageTextRetrieval(config).eval()
    path = tmp_path_factory.mktemp("blip-itm")
    hf.save_pretrained(path)
    return path, hf


def test_vilt_from_pretrained_keeps_weights_and_wrapper(vilt_dir):
    from trimkit_vilt import ViltAdapter, ViltForTrimming

    path, model = vilt_dir
    loaded = load_pretrained("vilt", str(path))
    assert isinstance(loaded, ViltForTrimming) and type(loaded.model).__name__ == "ViltForQuestionAnswering"
    assert loaded.trimkit_base == {"model": str(path), "revision": None}
    _same_weights(loaded, model)
    inputs = ViltAdapter().example_inputs(model, batch_size=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs), model(**inputs))
    assert not loaded.training


def test_vilt_task_heads_and_options(vilt_dir):
    path, model = vilt_dir
    bare = load_pretrained("vilt", path, task="model")  # the VQA checkpoint's ViltModel, head left out
    assert type(bare.model).__name__ == "ViltModel"
    torch.testing.assert_close(bare.model.pooler.dense.weight, model.model.vilt.pooler.dense.weight)
    with pytest.raises(PretrainedLoadError, match="new_head=True") as err:
        load_pretrained("vilt", path, task="retrieval")  # the checkpoint has no rank_output
    assert "rank_output" in str(err.value) and "ViltForQuestionAnswering" in str(err.value)
    retrieval = load_pretrained("vilt", path, task="retrieval", new_head=True)
    torch.testing.assert_close(retrieval.model.vilt.pooler.dense.weight, model.model.vilt.pooler.dense.weight)
    with pytest.raises(PretrainedLoadError, match="classifier.3.weight"):
        load_pretrained("vilt", path, num_labels=7)  # a head of another size needs new_head
    seven = load_pretrained("vilt", path, num_labels=7, new_head=True, hidden_dropout_prob=0.0)
    assert seven.model.classifier[3].out_features == 7 and seven.config.hidden_dropout_prob == 0.0
    torch.testing.assert_close(seven.model.classifier[0].weight, model.model.classifier[0].weight)
    with pytest.raises(PretrainedLoadError, match="hidden_size"):  # a config field that changes shapes
        load_pretrained("vilt", path, hidden_size=64)
    with pytest.raises(TypeError, match="hiden_size"):
        load_pretrained("vilt", path, hiden_size=64)
    with pytest.raises(TypeError, match="weights"):
        load_pretrained("vilt", path, weights="model.safetensors")


def test_blip_from_pretrained_tasks(blip_itm_dir):
    from trimkit_blip import BlipAdapter, BlipITMForTrimming, BlipNLVRForTrimming, BlipVQAClassifierForTrimming

    path, hf = blip_itm_dir
    itm = load_pretrained("blip", path)  # the task the checkpoint was saved as
    assert isinstance(itm, BlipITMForTrimming) and itm.trimkit_base["model"] == str(path)
    for key, value in itm.state_dict().items():
        assert torch.equal(value, hf.state_dict()[key]), key
    nlvr2 = load_pretrained("blip", path, task="nlvr2")  # Salesforce's NLVR2 start: both twins from the ITM layer
    assert isinstance(nlvr2, BlipNLVRForTrimming)
    cross = hf.text_encoder.encoder.layer[1].crossattention.self.query.weight
    assert torch.equal(nlvr2.text_encoder.encoder.layer[1].crossattention.self1.query.weight, cross)
    clf = load_pretrained("blip", path, task="vqa_classifier", num_labels=4)
    assert isinstance(clf, BlipVQAClassifierForTrimming) and clf.classifier.out_features == 4
    patches = hf.vision_model.embeddings.patch_embedding.weight
    assert torch.equal(clf.vision_model.embeddings.patch_embedding.weight, patches)
    with pytest.raises(PretrainedLoadError, match="text_decoder") as err:  # an ITM checkpoint has no answer decoder
        load_pretrained("blip", path, task="vqa")
    assert "BlipForImageTextRetrieval" in str(err.value)
    with pytest.raises(TypeError, match="num_labels"):
        load_pretrained("blip", path, task="itm", num_labels=3)
    big = load_pretrained("blip", path, image_size=48)  # position table resized once, config says so
    assert big.config.vision_config.image_size == 48
    assert big.vision_model.embeddings.position_embedding.shape[1] == (48 // 8) ** 2 + 1
    with torch.no_grad():
        assert big(**BlipAdapter().example_inputs(big)).shape == (1, 2)


def test_bridgetower_from_pretrained(tmp_path):
    from trimkit_bridgetower import BridgeTowerAdapter, BridgeTowerForTrimming

    model = BridgeTowerAdapter().build("tiny", seed=5)
    model.bridgetower.save_pretrained(tmp_path)
    loaded = load_pretrained("bridgetower", tmp_path, token_outputs=True)
    assert isinstance(loaded, BridgeTowerForTrimming) and loaded.token_outputs
    assert loaded.trimkit_base == {"model": str(tmp_path), "revision": None}
    _same_weights(loaded, model)


def test_hub_ids_come_from_the_local_cache_only(vilt_dir, hf_cache):
    path, model = vilt_dir
    with pytest.raises(PretrainedNotFoundError, match="not in the local HF cache") as err:
        load_pretrained("vilt", "trimkit-tests/tiny-vilt")
    assert "trimkit-tests/tiny-vilt" in str(err.value) and "nothing is downloaded" in str(err.value)
    _cache_repo(hf_cache, "trimkit-tests/tiny-vilt", sorted(path.iterdir()))
    loaded = load_pretrained("vilt", "trimkit-tests/tiny-vilt", revision="main")
    assert loaded.trimkit_base == {"model": "trimkit-tests/tiny-vilt", "revision": "main"}
    _same_weights(loaded, model)


def test_transformers_source_errors(vilt_dir, blip_itm_dir, tmp_path):
    vilt_path, _ = vilt_dir
    blip_path, _ = blip_itm_dir
    with pytest.raises(PretrainedLoadError, match="type 'blip'") as err:  # a BLIP directory given to vilt
        load_pretrained("vilt", blip_path)
    assert str(blip_path) in str(err.value) and "'vilt'" in str(err.value)
    with pytest.raises(PretrainedLoadError, match="type 'vilt'.*'bridgetower'"):
        load_pretrained("bridgetower", vilt_path)
    with pytest.raises(PretrainedNotFoundError, match="no such directory") as err:
        load_pretrained("blip", str(tmp_path / "missing" / "blip"))
    assert str(tmp_path / "missing" / "blip") in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PretrainedLoadError, match="no config.json"):
        load_pretrained("vilt", empty)
    broken = tmp_path / "broken"
    shutil.copytree(vilt_path, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(PretrainedLoadError, match="could not be read") as err:
        load_pretrained("vilt", broken)
    assert str(broken) in str(err.value)
    (broken / "model.safetensors").unlink()
    with pytest.raises(PretrainedLoadError, match="no ViltForQuestionAnswering weights"):
        load_pretrained("vilt", broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(PretrainedLoadError, match="not valid JSON"):
        load_pretrained("vilt", broken)


# --- timm -----------------------------------------------------------------------------------------
TIMM = dict(img_size=32, patch_size=8, depth=2)  # vit_tiny_patch16_224's width (192), 2 blocks, 32px


@pytest.fixture(scope="module")
def timm_files(tmp_path_factory):
    import safetensors.torch
    import timm

    torch.manual_seed(6)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **TIMM)
    path = tmp_path_factory.mktemp("timm")
    safetensors.torch.save_file(model.state_dict(), path / "vit.safetensors")
    torch.save({"state_dict": model.state_dict()}, path / "vit.pth")
    return path, model.eval()


@pytest.mark.parametrize("name", ["vit.safetensors", "vit.pth"])
def test_timm_from_a_weights_file(timm_files, name):
    path, model = timm_files
    loaded = load_pretrained("timm", "vit_tiny_patch16_224", weights=path / name, **TIMM)
    assert loaded.trimkit_base == {"model": "vit_tiny_patch16_224", "revision": None}
    assert loaded.num_classes == 10  # the file's classifier, kept
    _same_weights(loaded, model)


def test_timm_new_classifier_and_errors(timm_files, tmp_path, hf_cache, monkeypatch):
    path, model = timm_files
    five = load_pretrained("timm", "vit_tiny_patch16_224", weights=path / "vit.safetensors", num_classes=5, **TIMM)
    assert five.head.out_features == 5
    assert torch.equal(five.blocks[1].attn.qkv.weight, model.blocks[1].attn.qkv.weight)
    with pytest.raises(PretrainedLoadError, match="ResNet"):  # refused before any weights are read
        load_pretrained("timm", "resnet18", weights=path / "vit.pth")
    with pytest.raises(PretrainedLoadError, match="not a timm model name.*vit_tiny_patch16_224"):
        load_pretrained("timm", "vit_tiny_patch61_224", weights=path / "vit.pth")
    with pytest.raises(PretrainedNotFoundError, match="does not exist") as err:
        load_pretrained("timm", "vit_tiny_patch16_224", weights=tmp_path / "nope.safetensors")
    assert "nope.safetensors" in str(err.value)
    with pytest.raises(PretrainedLoadError, match="blocks.2") as err:  # a 3-block model from 2-block weights
        load_pretrained("timm", "vit_tiny_patch16_224", weights=path / "vit.safetensors", img_size=32, patch_size=8,
                        depth=3)
    assert "vit.safetensors" in str(err.value)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x07" * 40)
    with pytest.raises(PretrainedLoadError, match="bad.safetensors"):
        load_pretrained("timm", "vit_tiny_patch16_224", weights=bad)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    with pytest.raises(PretrainedNotFoundError, match="not cached locally") as err:
        load_pretrained("timm", "vit_tiny_patch16_224", **TIMM)
    assert "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k" in str(err.value)


def test_timm_tag_weights_from_the_local_hf_cache(timm_files, hf_cache):
    path, model = timm_files
    shutil.copy(path / "vit.safetensors", path / "model.safetensors")
    _cache_repo(hf_cache, "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", [path / "model.safetensors"])
    loaded = load_pretrained("timm", "vit_tiny_patch16_224", **TIMM)
    _same_weights(loaded, model)


# --- open_clip ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    import open_clip
    import safetensors.torch

    from trimkit_open_clip import TINY_TEXT, TINY_VISION

    path = tmp_path_factory.mktemp("open_clip")
    config = path / "trimkit-test-tiny-clip.json"
    config.write_text(json.dumps({"embed_dim": 32, "vision_cfg": TINY_VISION, "text_cfg": TINY_TEXT}))
    open_clip.add_model_config(config)  # the smallest config: a model name like open_clip's own
    torch.manual_seed(7)
    model = open_clip.create_model("trimkit-test-tiny-clip").eval()
    torch.save(model.state_dict(), path / "clip.pt")
    safetensors.torch.save_file(model.state_dict(), path / "clip.safetensors")
    return path, model


@pytest.mark.parametrize("part", ["visual", "clip", "text_guided"])
def test_open_clip_from_a_checkpoint_file(clip_files, part):
    from open_clip.transformer import VisionTransformer

    from trimkit_open_clip import TextGuidedCLIP

    path, model = clip_files
    loaded = load_pretrained("open_clip", "trimkit-test-tiny-clip", weights=path / "clip.safetensors", part=part)
    assert loaded.trimkit_base == {"model": "trimkit-test-tiny-clip", "revision": None}
    kind = {"visual": VisionTransformer, "clip": type(model), "text_guided": TextGuidedCLIP}[part]
    assert isinstance(loaded, kind) and not loaded.training
    _same_weights(loaded.visual if part == "text_guided" else loaded, model.visual if part != "clip" else model)


def test_open_clip_tiny_source_and_errors(clip_files, tmp_path, hf_cache):
    path, model = clip_files
    tiny = load_pretrained("open_clip", "tiny", weights=path / "clip.pt", part="clip")  # the adapter's own tiny
    _same_weights(tiny, model)
    with pytest.raises(PretrainedNotFoundError, match="weights="):
        load_pretrained("open_clip", "trimkit-test-tiny-clip")
    with pytest.raises(PretrainedNotFoundError, match="does not exist"):
        load_pretrained("open_clip", "trimkit-test-tiny-clip", weights=tmp_path / "nope.pt")
    with pytest.raises(PretrainedNotFoundError, match="not cached locally"):  # a tag: the HF cache only
        load_pretrained("open_clip", "ViT-B-32", weights="openai")
    with pytest.raises(PretrainedLoadError, match="ModifiedResNet"):
        load_pretrained("open_clip", "RN50", weights=path / "clip.pt")
    with pytest.raises(PretrainedLoadError, match="not an open_clip model name"):
        load_pretrained("open_clip", "ViT-B-61", weights=path / "clip.pt")
    other = tmp_path / "other.pt"  # weights of another (wider) tiny CLIP
    from trimkit_open_clip import OpenClipAdapter

    torch.save(OpenClipAdapter().build("tiny", part="clip", vision={"width": 32}).state_dict(), other)
    with pytest.raises(PretrainedLoadError, match="other.pt"):
        load_pretrained("open_clip", "trimkit-test-tiny-clip", weights=other)


# --- METER: official checkpoints -----------------------------------------------------------------
RELEASED = {  # METER's released checkpoints: the loss_names they were trained with -> the MeterModel task
    "pretrain": (("mlm", "itm"), "itm"), "vqa": (("vqa",), "vqa"), "nlvr2": (("nlvr2",), "nlvr2"),
    "snli": (("snli",), "snli_ve"), "flickr": (("itm", "irtr"), "itm"),
}


@pytest.mark.parametrize("release", sorted(RELEASED))
def test_every_official_key_is_mapped_or_dropped(release):
    from trimkit_meter import build_meter
    from trimkit_meter.convert import convert_meter_checkpoint, load_meter_checkpoint

    losses, task = RELEASED[release]
    model = build_meter("tiny", task=task, num_labels=7 if task == "vqa" else None)
    # the VQA checkpoint was fine-tuned at a higher resolution (576px for 288px models): positions interpolate
    symbols = meter_symbols(model.config, image_size=96 if release == "vqa" else model.config.image_size)
    official = official_meter_state_dict(symbols, losses)
    conv = convert_meter_checkpoint({"state_dict": official}, model.config)
    by_id = {id(v): k for k, v in official.items()}
    mapped = {by_id[id(v)]: k for k, v in conv.state_dict.items() if id(v) in by_id}  # official -> ours, unchanged
    adapted = {ADAPTED_FROM[k]: k for k in conv.adapted}  # official -> ours, shape made to fit the model
    assert set(adapted) == ({"vit_model.visual.positional_embedding"} if release == "vqa" else set())
    # every official key is mapped into the model (as it is or adapted) or dropped with a reason
    assert set(mapped) | set(adapted) | set(conv.dropped) == set(official)
    assert not (set(mapped) | set(adapted)) & set(conv.dropped) and not set(mapped) & set(adapted)
    assert all(isinstance(reason, str) and reason for reason in conv.dropped.values())
    heads = tuple({"mlm": "mlm_score.", "irtr": "rank_output."}[x] for x in losses if x in ("mlm", "irtr"))
    assert set(conv.dropped) == UNUSED_OFFICIAL | {k for k in official if heads and k.startswith(heads)}
    assert set(conv.state_dict) == set(model.state_dict())
    report = load_meter_checkpoint(official, model)  # strict
    assert not report.missing and not report.unexpected and not report.mismatched
    loaded = model.state_dict()
    for theirs, ours in mapped.items():
        assert torch.equal(loaded[ours], official[theirs]), theirs
    for theirs, ours in adapted.items():  # the interpolated position table keeps the [CLS] row
        assert loaded[ours].shape == (model.config.num_patches + 1, model.config.vision_width)
        assert torch.equal(loaded[ours][0], official[theirs][0])


ADAPTED_FROM = {"vit_model.positional_embedding": "vit_model.visual.positional_embedding",
                "token_type_embeddings.weight": "token_type_embeddings.weight"}


def test_official_key_list_fits_meter_base():
    """At the paper's sizes (on the meta device) the released VQAv2 checkpoint's keys fit METER_BASE."""
    from trimkit_meter import METER_BASE, MeterModel
    from trimkit_meter.convert import convert_meter_checkpoint

    assert METER_BASE.vision_heads == METER_BASE.vision_width // 64  # METER's CLIP: one head per 64 channels
    symbols = meter_symbols(METER_BASE, image_size=576)  # meter_clip16_288_roberta_vqa.ckpt: 576px
    assert symbols["mlp_ratio"] == 4 and symbols["clip_layers"] == 12 and symbols["roberta_positions"] == 514
    official = {k: torch.empty(shape, device="meta") for k, shape in official_meter_keys(symbols, ["vqa"]).items()}
    with torch.device("meta"):
        model = MeterModel(METER_BASE)
    conv = convert_meter_checkpoint(official, METER_BASE)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in conv.state_dict.items()} == shapes
    assert set(conv.dropped) == UNUSED_OFFICIAL and set(conv.adapted) == {"vit_model.positional_embedding"}


def _save_official(tmp_path, release: str, name: str = "meter.ckpt", **symbols) -> tuple:
    from trimkit_meter import METER_TINY

    losses, task = RELEASED[release]
    official = official_meter_state_dict(meter_symbols(METER_TINY, **symbols), losses, seed=1)
    path = tmp_path / name
    torch.save({"state_dict": official, "epoch": 3, "global_step": 10}, path)
    return path, official


def test_meter_from_an_official_checkpoint(tmp_path):
    from trimkit_meter import MeterModel

    path, official = _save_official(tmp_path, "vqa", vqav2_label_size=7)
    model = load_pretrained("meter", path, size="tiny")
    assert isinstance(model, MeterModel) and not model.training
    assert model.config.task == "vqa" and model.config.num_labels == 7  # from the checkpoint's head
    assert model.trimkit_base == {"model": str(path), "revision": None}
    loaded = model.state_dict()
    for key, value in official.items():
        if key not in UNUSED_OFFICIAL:
            assert torch.equal(loaded[key.replace("vit_model.visual.", "vit_model.")], value), key
    pre, _ = _save_official(tmp_path, "pretrain", "pretrain.ckpt")
    assert load_pretrained("meter", pre, size="tiny").config.task == "itm"  # its itm_score head
    with pytest.raises(PretrainedLoadError, match="vqa_classifier") as err:  # no VQA head in pre-training
        load_pretrained("meter", pre, size="tiny", task="vqa")
    assert "pretrain.ckpt" in str(err.value)
    fresh = load_pretrained("meter", pre, size="tiny", task="vqa", num_labels=5, new_head=True, seed=0)
    assert fresh.vqa_classifier[3].out_features == 5
    again = load_pretrained("meter", pre, size="tiny", task="vqa", num_labels=5, new_head=True, seed=0)
    assert torch.equal(fresh.vqa_classifier[3].weight, again.vqa_classifier[3].weight)  # seeded
    pretrained = torch.load(pre, weights_only=True)["state_dict"]
    assert torch.equal(fresh.cross_modal_image_pooler.dense.weight, pretrained["cross_modal_image_pooler.dense.weight"])


def test_meter_from_pretrained_errors(tmp_path):
    with pytest.raises(PretrainedNotFoundError, match="no such file") as err:
        load_pretrained("meter", tmp_path / "meter_clip16_288_roberta_vqa.ckpt")
    assert "meter_clip16_288_roberta_vqa.ckpt" in str(err.value)
    path, official = _save_official(tmp_path, "vqa")
    with pytest.raises(PretrainedLoadError, match="shape") as err:  # a checkpoint of other sizes
        load_pretrained("meter", path, size="tiny", hidden_size=32, cross_intermediate=64)
    assert "meter.ckpt" in str(err.value) and "size=" in str(err.value)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedLoadError, match="bad.ckpt.*damaged"):
        load_pretrained("meter", bad, size="tiny")
    import argparse

    lightning = tmp_path / "lightning.ckpt"  # as METER's released files: pickled objects next to the weights
    torch.save({"state_dict": official, "hyper_parameters": argparse.Namespace(lr=1e-5)}, lightning)
    with pytest.raises(PretrainedLoadError, match="allow_pickle=True"):
        load_pretrained("meter", lightning, size="tiny")
    assert load_pretrained("meter", lightning, size="tiny", allow_pickle=True).config.task == "vqa"
    with pytest.raises(TypeError, match="revision"):
        load_pretrained("meter", path, revision="main")
    directory = tmp_path / "not-a-checkpoint"
    directory.mkdir()
    with pytest.raises(PretrainedLoadError, match="not a trimkit checkpoint"):
        load_pretrained("meter", directory)


def test_meter_from_a_trimkit_checkpoint_directory(tmp_path):
    import trimkit
    from trimkit_meter import build_meter

    torch.manual_seed(2)
    model = build_meter("tiny").eval()
    tmodel = trimkit.trim(model, trimkit.TrimConfig(token_target={"vision": 0.5, "text": 0.8}))
    tmodel.save_pretrained(tmp_path / "run", include_backbone=True, build_options={"size": "tiny"})
    loaded = load_pretrained("meter", tmp_path / "run")
    _same_weights(loaded, model)
    tmodel.save_pretrained(tmp_path / "light", include_backbone=False, build_options={"size": "tiny"})
    with pytest.raises(PretrainedLoadError, match="backbone"):
        load_pretrained("meter", tmp_path / "light")
