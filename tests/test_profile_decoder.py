"""``trimkit profile`` for decoders (adapters exposing generation: ``trimkit_llava``) and the paper-size
MACs counting of ``benchmarks/decoder_macs.py`` (meta device + closed form), on tiny and small LLaVAs:

* the command runs (function, CLI text, CLI JSON), and ``--help`` lists its options;
* a trimmed prefill costs fewer MACs than the full one; the first decode step on the trimmed cache
  costs fewer MACs than on the full cache, exactly the closed form computed from the per-layer cache
  lengths the prefill reports (and not the full cache's value);
* ``benchmarks/decoder_macs.py``'s meta-device counts equal ``count_macs`` of the real tiny model's
  prefill (mode off) and of ``decode_step`` on a real trimmed cache, and the closed form equals the
  meta count on a small GQA config at several per-layer lengths.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import decoder_macs as dm  # noqa: E402

from trimkit.cli import main  # noqa: E402
from trimkit.commands.profile import generation_of, profile  # noqa: E402
from trimkit.plugins import get_registry  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(  # a small LLaVA unlike the tiny one: GQA 6/2 heads, head dim 16, 3 layers, 4x4 patches + [CLS]
    vision_config=dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3,
                       image_size=28, patch_size=7, projection_dim=48),
    text_config=dict(vocab_size=96, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                     num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256),
    image_token_id=3, projector_hidden_act="gelu", vision_feature_layer=-2)


@pytest.fixture(scope="module")
def decoder_profile():
    return profile("llava", repeats=1, instances=2, threads=1, new_tokens=2)


def test_llava_exposes_generation_and_meter_does_not():
    registry = get_registry()
    gen = generation_of(registry.adapters.get("llava"))
    assert gen is not None and gen.__name__ == "trimkit_llava.generation"
    assert generation_of(registry.adapters.get("meter")) is None


def test_profile_decoder_trimmed_costs_less_and_decode_macs_follow_cache_lengths(decoder_profile):
    d = decoder_profile["decoder"]
    text = get_registry().adapters.get("llava").build().config.text_config
    n_layers = text.num_hidden_layers
    pairs = zip(d["prefill_macs_full_per_instance"], d["prefill_macs_trimmed_per_instance"],
                d["decode_step_macs_full_per_instance"], d["decode_step_macs_trimmed_per_instance"],
                d["cache_lengths_full_per_instance"], d["cache_lengths_trimmed_per_instance"])
    for pre_full, pre_trim, dec_full, dec_trim, len_full, len_trim in pairs:
        assert pre_trim < pre_full
        assert len(len_full) == len(len_trim) == n_layers
        assert len(set(len_full)) == 1  # untrimmed: every layer caches every prompt token
        assert all(t <= f for t, f in zip(len_trim, len_full)) and sum(len_trim) < sum(len_full)
        assert dec_trim < dec_full
        assert dec_full == dm.closed_form_decode(text, len_full)
        assert dec_trim == dm.closed_form_decode(text, len_trim)
        assert dec_trim != dm.closed_form_decode(text, len_full)  # the lengths matter: the check can tell
    assert d["prefill_macs_ratio"] > 1 and d["decode_step_macs_ratio"] > 1
    assert d["new_tokens"] == 2 and d["rounds"] == 2 and d["engine"] == "remove"  # rounds: repeats x instances
    for k in ("prefill_latency_full_ms", "prefill_latency_trimmed_ms", "decode_tokens_per_s_full",
              "decode_tokens_per_s_trimmed", "prefill_speed_ratio", "decode_speed_ratio"):
        assert d[k] > 0, k
    # the encoder part is unchanged: the prefill is the trimmed model's own forward
    assert d["prefill_macs_full"] == decoder_profile["macs_full"]


def test_profile_decoder_cli_text_and_json(capsys):
    assert main(["profile", "--adapter", "llava", "--repeats", "1", "--instances", "1", "--threads", "1",
                 "--new-tokens", "2"]) == 0
    text = capsys.readouterr().out
    for row in ("prefill MACs", "decode-step MACs", "KV cache keys", "prefill latency", "decode tokens/s (batch 1, 2 "):
        assert row in text, row
    assert main(["profile", "--adapter", "llava", "--repeats", "1", "--instances", "1", "--threads", "1",
                 "--batch", "2", "--new-tokens", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # the ratios compare instances prefilled alone on both sides; the packed batch is reported beside them
    assert out["decoder"]["engine"] == "remove" and out["decoder"]["decode_tokens_per_s_trimmed"] > 0
    assert out["decoder"]["prefill_latency_trimmed_packed_ms"] > 0
    assert out["decoder"]["decode_tokens_per_s_trimmed_packed"] > 0
    assert main(["profile", "--adapter", "llava", "--repeats", "1", "--instances", "1", "--threads", "1",
                 "--new-tokens", "0", "--json"]) == 0
    assert "decoder" not in json.loads(capsys.readouterr().out)


def test_profile_help_lists_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["profile", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--adapter", "--size", "--batch", "--device", "--dtype", "--reduction", "--checkpoint", "--repeats",
                "--instances", "--threads", "--seed", "--new-tokens", "--json"):
        assert opt in text, opt


def test_new_tokens_checked():
    with pytest.raises(ValueError, match="new_tokens must be an integer >= 0"):
        profile("llava", new_tokens=-1)


def test_meta_counts_equal_the_real_tiny_model():
    """benchmarks/decoder_macs.py's layer-by-layer counts (meta device) against count_macs of the real
    tiny model's prefill (mode off, lm_head on every row as LlavaForTrimming does) and decode step on a
    trimmed cache."""
    from conftest import randomize_trimmers

    import trimkit
    from trimkit.macs import count_macs
    from trimkit_llava import TINY_TEXT, TINY_VISION
    from trimkit_llava.generation import decode_step, prefill

    impl = get_registry().adapters.get("llava")
    model = impl.build()
    x = impl.example_inputs(model, batch_size=1, seed=3, prompts=[3], questions=[4])
    tmodel = trimkit.trim(model, trimkit.TrimConfig(token_target={"prompt": 0.7, "image": 0.4, "question": 0.7}),
                          adapter="llava").eval()
    randomize_trimmers(tmodel, 5)
    args = {k: x[k] for k in ("input_ids", "pixel_values", "attention_mask")}
    meta = dm.build_meta(TINY_VISION, TINY_TEXT, image_token_id=model.config.image_token_id,
                         projector_hidden_act="gelu")
    n = x["input_ids"].shape[1]
    full = count_macs(prefill, tmodel, **args, mode="off").total
    assert dm.prefill_macs(meta, 3, 4, [n] * 4, lm_head_rows="all").total == full
    assert dm.closed_form_prefill(meta.config, [n] * 4, lm_head_rows=n) == full
    with torch.no_grad():
        logits, cache = prefill(tmodel, **args, mode="remove")
    lengths = cache.lengths[0]
    assert sum(lengths) < 4 * n
    measured = count_macs(decode_step, tmodel, cache, logits.argmax(-1), 0).total
    assert dm.decode_macs(meta, lengths, position=n).total == measured
    assert dm.decode_macs(meta, [n] * 4, position=n).total > measured


@pytest.mark.parametrize("keep,from_layer", [(1.0, 0), (0.5, 1), (0.25, 0), (0.0, 2)])
def test_closed_form_equals_meta_count_on_a_small_config(keep, from_layer):
    meta = dm.build_meta(**SMALL)
    cfg = meta.config
    assert dm.image_tokens(cfg) == 16 and all(p.is_meta for p in meta.parameters())
    lengths = dm.layer_lengths(cfg, 5, 7, keep, from_layer)
    assert lengths[-1] == 12 + round(16 * keep) and lengths[0] == (28 if from_layer else lengths[-1])
    assert dm.prefill_macs(meta, 5, 7, lengths).total == dm.closed_form_prefill(cfg, lengths)
    assert dm.prefill_macs(meta, 5, 7, lengths, lm_head_rows="all").total == \
        dm.closed_form_prefill(cfg, lengths, lm_head_rows=lengths[-1])
    assert dm.decode_macs(meta, lengths).total == dm.closed_form_decode(cfg.text_config, lengths)
    if keep < 1:  # trimming shows in both counts
        full = [28] * 3
        assert dm.prefill_macs(meta, 5, 7, lengths).total < dm.prefill_macs(meta, 5, 7, full).total
        assert dm.decode_macs(meta, lengths).total < dm.decode_macs(meta, full).total
