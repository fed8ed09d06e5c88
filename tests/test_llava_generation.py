"""Generation from a trimmed LLaVA (``trimkit_llava.generate``) whose KV cache holds only the kept
tokens, on tiny random models:

* everything kept: the generated tokens are transformers' own ``generate(do_sample=False)``;
* random trimmers: the masked prefill's next-token logits are the removed prefill's, and the
  removed cache holds exactly the kept tokens' keys and values (the masked cache's kept rows);
* the cache is shorter in and after the trimmed layers, and every decode step's logits equal an
  independent reference: the trimmed model's own masked forward over prompt + generated tokens
  with the token decisions of the removed prefill forced and every new token kept, so each new
  token attends in each layer to exactly the keys that layer kept (at positions n + t); a cache
  that also held the dropped tokens gives other logits (checked, so the reference can tell);
* a batch whose instances kept different counts (padded, masked caches) generates what each
  instance generates alone; left padding and other misuse are refused by name.
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_trimmers

import trimkit
from trimkit import TrimConfig
from trimkit.plugins import get_registry

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = {"prompt": 0.7, "image": 0.4, "question": 0.7}
LAYERS = [f"model.model.language_model.layers.{i}" for i in range(4)]
NEVER = []  # eos_token_id=[]: no early stop, every instance generates max_new_tokens


@pytest.fixture(scope="module")
def adapter():
    return get_registry().adapters.get("llava")


@pytest.fixture(scope="module")
def model(adapter):
    return adapter.build()


def _trimmed(model, seed=None, heads=True):
    """A trimmed tiny LLaVA: fresh trimmers keep everything; ``seed``: random trimmers."""
    config = TrimConfig(token_target=TARGETS, head_target=0.5) if heads else \
        TrimConfig(token_target=TARGETS, trim_heads=False)
    tmodel = trimkit.trim(model, config, adapter="llava").eval()
    if seed is not None:
        randomize_trimmers(tmodel, seed)
    return tmodel


def _alone(x, b):
    """Instance ``b`` of a right-padded batch alone: its real tokens, no padding."""
    n = int(x["attention_mask"][b].sum())
    return x["input_ids"][b:b + 1, :n], x["pixel_values"][b:b + 1]


def _hf_generate(model, ids, pixels, max_new_tokens, logits=False, **kw):
    """transformers' greedy generation of one instance: its new tokens (and the logits each came from)."""
    with torch.no_grad():
        out = model.model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                                   max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True,
                                   output_logits=True, **kw)
    tokens = out.sequences[0, ids.shape[1]:]
    return (tokens, torch.cat(out.logits)) if logits else tokens


def _kept_counts(tmodel, length):
    """Tokens each decoder layer computed in the last (batch-1, removed) forward, from its records."""
    counts, current = [], length
    for path in LAYERS:
        rec = [r for r in tmodel.records if r.kind == "token" and r.key.startswith(path + ":")]
        if rec:
            current = rec[0].index.numel()
        counts.append(current)
    return counts


def test_everything_kept_generates_what_transformers_generates(adapter, model):
    from trimkit_llava import generate

    tmodel = _trimmed(model)  # fresh trimmers keep every token and head
    x = adapter.example_inputs(model, 3, seed=11)
    T = 8
    out = generate(tmodel, x["input_ids"], x["pixel_values"], x["attention_mask"], max_new_tokens=T,
                   return_logits=True)
    lengths = x["attention_mask"].sum(1).tolist()
    assert out.prompt_lengths == lengths and len(set(lengths)) > 1  # right-padded, lengths differ
    assert out.cache_lengths == [[n] * 4 for n in lengths]  # nothing trimmed: every layer caches every token
    off = generate(tmodel, x["input_ids"], x["pixel_values"], x["attention_mask"], max_new_tokens=T, mode="off")
    assert torch.equal(off.tokens, out.tokens)
    pad = model.config.text_config.pad_token_id
    full = 0
    for b in range(3):  # the model's own EOS and padding on both sides
        ids, pixels = _alone(x, b)
        hf, hf_logits = _hf_generate(model, ids, pixels, T, logits=True)
        hf = hf.tolist()
        row = out.tokens[b].tolist()
        assert row[:len(hf)] == hf and all(t == pad for t in row[len(hf):]), (b, row, hf)
        torch.testing.assert_close(out.logits[b, :len(hf)], hf_logits, atol=1e-4, rtol=0)  # every step's scores
        full += len(hf) == T
        alone = generate(tmodel, ids, pixels, max_new_tokens=T)
        assert alone.tokens[0].tolist() == hf
    assert out.tokens.shape == (3, T) and full >= 1
    # an EOS that one instance generates at step k (and not before): it stops there (padding after)
    b0 = next(b for b in range(3) if pad not in out.tokens[b].tolist())
    row0 = out.tokens[b0].tolist()
    k = next(k for k in range(1, T) if row0[k] not in row0[:k])
    eos = row0[k]
    stop = generate(tmodel, x["input_ids"], x["pixel_values"], x["attention_mask"], max_new_tokens=T,
                    eos_token_id=eos, pad_token_id=pad)
    for b in range(3):
        ids, pixels = _alone(x, b)
        hf = _hf_generate(model, ids, pixels, T, eos_token_id=eos, pad_token_id=pad).tolist()
        row = stop.tokens[b].tolist()
        assert row[:len(hf)] == hf and all(t == pad for t in row[len(hf):]), (b, row, hf)
    assert stop.tokens[b0].tolist() == row0[:k + 1] + [pad] * (stop.tokens.shape[1] - k - 1)
    assert stop.generated[b0] == k + 1
    seq = stop.sequences(x["input_ids"])[b0]
    assert seq.tolist() == x["input_ids"][b0, :lengths[b0]].tolist() + row0[:k + 1]


def test_sampling_with_everything_kept_is_transformers_sampling(adapter, model):
    """``do_sample=True`` under the same global seed samples transformers' own tokens (its warpers,
    its order, its multinomial draw), and is not greedy decoding."""
    from trimkit_llava import generate

    tmodel = _trimmed(model)
    x = adapter.example_inputs(model, 3, seed=21)
    opts = {"temperature": 0.7, "top_k": 20, "top_p": 0.9}
    pad = model.config.text_config.pad_token_id
    differ = False
    for b in range(3):
        ids, pixels = _alone(x, b)
        torch.manual_seed(100 + b)
        ours = generate(tmodel, ids, pixels, max_new_tokens=8, do_sample=True, **opts).tokens[0].tolist()
        torch.manual_seed(100 + b)
        with torch.no_grad():
            hf = model.model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=8, do_sample=True, **opts)[0, ids.shape[1]:].tolist()
        assert ours[:len(hf)] == hf and all(t == pad for t in ours[len(hf):]), (b, ours, hf)
        differ |= ours != generate(tmodel, ids, pixels, max_new_tokens=8).tokens[0].tolist()
    assert differ


def test_sampled_generation_removed_equals_masked(adapter, model):
    """With random trimmers, the removed (short) cache and the masked full-length one sample the
    same tokens from the same random source."""
    from trimkit_llava import generate

    tmodel = _trimmed(model, 61)
    x = adapter.example_inputs(model, 3, seed=62)
    args = (x["input_ids"], x["pixel_values"], x["attention_mask"])
    kw = {"max_new_tokens": 6, "eos_token_id": NEVER, "do_sample": True, "top_k": 0, "return_logits": True}
    removed = generate(tmodel, *args, generator=torch.Generator().manual_seed(5), **kw)
    masked = generate(tmodel, *args, generator=torch.Generator().manual_seed(5), mode="hard", **kw)
    assert any(c < n for row, n in zip(removed.cache_lengths, removed.prompt_lengths) for c in row)
    torch.testing.assert_close(removed.logits, masked.logits, atol=1e-4, rtol=0)
    assert torch.equal(removed.tokens, masked.tokens)
    other = generate(tmodel, *args, generator=torch.Generator().manual_seed(6), **kw)
    assert not torch.equal(other.tokens, removed.tokens)  # the generator is what the draws come from
    with pytest.raises(ValueError, match="pass do_sample=True"):
        generate(tmodel, *args, max_new_tokens=2, temperature=0.5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        generate(tmodel, *args, max_new_tokens=2, do_sample=True, temperature=0.0)


def test_masked_prefill_equals_removed_prefill(adapter, model):
    """Random trimmers: the next-token logits of the removed prefill (each instance alone) are those of
    the masked batch forward at each instance's last real token, and of the masked prefill; the
    removed cache's rows are the masked cache's kept rows, key for key."""
    from trimkit_llava import prefill

    dropped = set()
    for seed in range(3):
        tmodel = _trimmed(model, 60 + seed)
        x = adapter.example_inputs(model, 3, seed=70 + seed)
        last = x["attention_mask"].sum(1) - 1
        with torch.no_grad():
            removed, rcache = prefill(tmodel, x["input_ids"], x["pixel_values"], x["attention_mask"])
            masked, mcache = prefill(tmodel, x["input_ids"], x["pixel_values"], x["attention_mask"], mode="hard")
            with tmodel.mode("hard"):
                batch = tmodel(**x)[torch.arange(3), last]
                dropped |= {r.key.split(":")[1] for r in tmodel.records
                            if r.kind == "token" and float(r.keep.min()) < 1}
            with tmodel.mode("off"):
                full = tmodel(**x)[torch.arange(3), last]
        torch.testing.assert_close(removed, batch, atol=1e-4, rtol=0)
        torch.testing.assert_close(masked, batch, atol=1e-4, rtol=0)
        assert float((removed - full).abs().max()) > 1e-2  # the trimming changed the prediction
        assert rcache.lengths == mcache.lengths
        for i in range(4):
            rk, rv = rcache.cache.layers[i].keys, rcache.cache.layers[i].values
            mk, mv = mcache.cache.layers[i].keys, mcache.cache.layers[i].values
            assert mk.shape[2] == max(rcache.prompt_lengths)  # masked: every token cached
            for b in range(3):
                n = rcache.lengths[b][i]
                assert bool(rcache.valid[i][b, :n].all()) and not bool(rcache.valid[i][b, n:].any())
                kept = mcache.valid[i][b]
                assert int(kept.sum()) == n
                torch.testing.assert_close(rk[b, :, :n], mk[b][:, kept], atol=1e-4, rtol=0)
                torch.testing.assert_close(rv[b, :, :n], mv[b][:, kept], atol=1e-4, rtol=0)
    assert "image" in dropped


def test_trimmed_cache_is_shorter_and_decode_reads_only_the_kept_keys(adapter, model):
    """The removed cache holds the records' kept counts (fewer than the prompt in the trimmed layers
    and after them); each decode step's logits equal the trimmed model's own masked forward over
    prompt + generated tokens with the prefill's token decisions forced and the new tokens kept."""
    from trimkit_llava import generate, prefill

    T = 4
    for seed in range(2):
        tmodel = _trimmed(model, 80 + seed, heads=False)  # new tokens and prompt tokens use every head alike
        x = adapter.example_inputs(model, 1, seed=90 + seed)
        ids, pixels = x["input_ids"], x["pixel_values"]
        N = ids.shape[1]
        out = generate(tmodel, ids, pixels, max_new_tokens=T, eos_token_id=NEVER, return_logits=True)
        records = list(tmodel.records)  # of the last forward run: the removed prefill
        counts = _kept_counts(tmodel, N)
        assert out.cache_lengths == [counts]
        assert counts[0] == N and all(c < N for c in counts[1:]), counts  # trimmed from layer 1 on
        _, kept = prefill(tmodel, ids, pixels)
        assert [kept.cache.layers[i].keys.shape[2] for i in range(4)] == counts  # the cache itself is short
        assert kept.masked == [False] * 4  # batch 1: no padding, no mask

        # the reference: prompt + generated tokens (but the last) in one masked forward
        ext = torch.cat([ids, out.tokens[:, :-1]], 1)
        index = {r.key.split(":")[0]: r.index for r in records if r.kind == "token"}
        assert sorted(index) == LAYERS[1:3]
        forced = {}
        for path, idx in index.items():
            logits = torch.full((1, ext.shape[1]), -1.0)
            logits[0, idx] = 1.0
            logits[0, N:] = 1.0  # every new token kept
            forced[path] = logits
        from trimkit_llava import llava_segment_starts

        xe = {"pixel_values": pixels, "input_ids": ext, "attention_mask": torch.ones_like(ext),
              "segment_starts": llava_segment_starts(ext, model.config.image_token_id)}
        tmodel.runtime.forced.update(forced)
        try:
            with torch.no_grad(), tmodel.mode("hard"):
                ref = tmodel(**xe)[0, N - 1:]
            kept_ref = {r.key.split(":")[0]: r.mask[0] for r in tmodel.records if r.kind == "token"}
        finally:
            for path in forced:
                tmodel.runtime.forced.pop(path)
        for path, idx in index.items():  # the reference kept exactly the prefill's tokens, and the new ones
            assert torch.nonzero(kept_ref[path][:N]).flatten().tolist() == idx.tolist()
            assert bool(kept_ref[path][N:].all())
        torch.testing.assert_close(out.logits[0], ref, atol=1e-4, rtol=0)
        assert torch.equal(out.tokens[0], ref.argmax(-1))

        # a cache that also held the dropped tokens (the masked prefill's, every row valid) reads other keys
        with torch.no_grad():
            logits0, leaky = prefill(tmodel, ids, pixels, mode="hard")
            leaky.valid = [torch.ones_like(v) for v in leaky.valid]
            leaky.masked = [False] * 4
            from trimkit_llava.generation import decode_step

            wrong = decode_step(tmodel, leaky, out.tokens[:, 0], 0)
        torch.testing.assert_close(logits0[0], ref[0], atol=1e-4, rtol=0)
        assert float((wrong[0] - ref[1]).abs().max()) > 1e-3


def test_head_trimmed_removed_generation_equals_masked_generation(adapter, model):
    """With heads trimmed too (prompt tokens attend with the kept heads, new tokens with all): the
    removed (short) cache decodes what the masked full-length cache with each layer's dropped keys
    masked decodes."""
    from trimkit_llava import generate

    heads_dropped = False
    for seed in range(2):
        tmodel = _trimmed(model, 100 + seed)
        x = adapter.example_inputs(model, 2, seed=110 + seed)
        args = (x["input_ids"], x["pixel_values"], x["attention_mask"])
        removed = generate(tmodel, *args, max_new_tokens=5, eos_token_id=NEVER, return_logits=True)
        heads_dropped |= any(r.kind == "head" and float(r.keep.min()) < 1 for r in tmodel.records)
        masked = generate(tmodel, *args, max_new_tokens=5, eos_token_id=NEVER, return_logits=True, mode="hard")
        assert removed.cache_lengths == masked.cache_lengths
        assert any(c < n for row, n in zip(removed.cache_lengths, removed.prompt_lengths) for c in row)
        torch.testing.assert_close(removed.logits, masked.logits, atol=1e-4, rtol=0)
        assert torch.equal(removed.tokens, masked.tokens)
    assert heads_dropped


def test_bucketed_model_generates_with_exact_caches(adapter, model):
    """A model set to bucketed execution (``tmodel.bucketing``, what ``tmodel.compile`` sets) generates
    what it generates without: the prefill runs with exact kept counts (``tmodel.eager()``), so no slack
    row enters the cache; the bucketed forward itself does pad (checked), and the setting is kept."""
    from trimkit.engine.buckets import Bucketing
    from trimkit_llava import generate

    tmodel = _trimmed(model, 140)
    x = adapter.example_inputs(model, 2, seed=141)
    args = (x["input_ids"], x["pixel_values"], x["attention_mask"])
    plain = generate(tmodel, *args, max_new_tokens=5, eos_token_id=NEVER, return_logits=True)
    b = tmodel.bucketing = Bucketing(3)
    with torch.no_grad(), tmodel.mode("remove"):
        tmodel(**{k: v[:1] for k, v in x.items()})
    assert b.padded > 0  # the forward pads: generation must not
    calls = b.calls
    bucketed = generate(tmodel, *args, max_new_tokens=5, eos_token_id=NEVER, return_logits=True)
    assert b.calls == calls and tmodel.bucketing is b
    assert bucketed.cache_lengths == plain.cache_lengths
    torch.testing.assert_close(bucketed.logits, plain.logits, atol=1e-5, rtol=0)
    assert torch.equal(bucketed.tokens, plain.tokens)


def test_batched_generation_with_per_instance_counts_equals_each_alone(adapter, model):
    from trimkit_llava import generate, prefill

    differ = False
    for seed in range(2):
        tmodel = _trimmed(model, 120 + seed)
        x = adapter.example_inputs(model, 3, seed=130 + seed)
        T = 6
        batch = generate(tmodel, x["input_ids"], x["pixel_values"], x["attention_mask"], max_new_tokens=T,
                         eos_token_id=NEVER, return_logits=True)
        _, kept = prefill(tmodel, x["input_ids"], x["pixel_values"], x["attention_mask"])
        assert kept.stored == [max(row[i] for row in kept.lengths) for i in range(4)]
        differ |= any(len({row[i] for row in batch.cache_lengths}) > 1 for i in range(1, 4))
        assert kept.masked[0] == (len(set(batch.prompt_lengths)) > 1)
        assert kept.masked == [len({row[i] for row in kept.lengths}) > 1 for i in range(4)]
        for b in range(3):
            ids, pixels = _alone(x, b)
            alone = generate(tmodel, ids, pixels, max_new_tokens=T, eos_token_id=NEVER, return_logits=True)
            assert alone.cache_lengths == [batch.cache_lengths[b]]
            torch.testing.assert_close(batch.logits[b], alone.logits[0], atol=1e-4, rtol=0)
            assert torch.equal(batch.tokens[b], alone.tokens[0])
        # the whole batch prefilled in one packed forward: the same caches, logits and tokens
        packed = generate(tmodel, x["input_ids"], x["pixel_values"], x["attention_mask"], max_new_tokens=T,
                          eos_token_id=NEVER, return_logits=True, mode="packed")
        assert packed.cache_lengths == batch.cache_lengths
        torch.testing.assert_close(packed.logits, batch.logits, atol=1e-4, rtol=0)
        assert torch.equal(packed.tokens, batch.tokens)
        _, pkept = prefill(tmodel, x["input_ids"], x["pixel_values"], x["attention_mask"], mode="packed")
        for i in range(4):
            torch.testing.assert_close(pkept.cache.layers[i].keys, kept.cache.layers[i].keys, atol=1e-4, rtol=0)
            torch.testing.assert_close(pkept.cache.layers[i].values, kept.cache.layers[i].values, atol=1e-4, rtol=0)
            assert torch.equal(pkept.valid[i], kept.valid[i])
        seqs = batch.sequences(x["input_ids"])
        assert [s.numel() for s in seqs] == [n + T for n in batch.prompt_lengths] and batch.generated == [T] * 3
    assert differ  # instances kept different counts in some trimmed layer


def _left_padded(ids, mask):
    """A right-padded batch with each row's padding moved to its left (transformers' padding_side='left')."""
    shifts = [int((row == 0).sum()) for row in mask]
    return (torch.stack([row.roll(s) for row, s in zip(ids, shifts)]),
            torch.stack([row.roll(s) for row, s in zip(mask, shifts)]))


def test_left_padded_batches_generate_transformers_tokens(adapter, model):
    """transformers' batched generation pads on the left: with everything kept, our tokens are its own
    generate() on that batch; trimmed, a left-padded batch generates exactly what its right-padded
    twin does (the same positions), and sequences() reads the prompt where it sits."""
    from trimkit_llava import generate, right_align

    x = adapter.example_inputs(model, 3, seed=11)
    ids, mask = _left_padded(x["input_ids"], x["attention_mask"])
    assert not bool(mask[:, 0].all()) and bool(mask[:, -1].all())  # padding on the left of some rows
    back, back_mask, starts = right_align(ids, mask)
    assert torch.equal(back, x["input_ids"]) and torch.equal(back_mask, x["attention_mask"])
    assert starts == [int((m == 0).sum()) for m in x["attention_mask"]] and max(starts) > 0
    T = 6
    with torch.no_grad():
        hf = model.model.generate(input_ids=ids, pixel_values=x["pixel_values"], attention_mask=mask,
                                  max_new_tokens=T, do_sample=False, min_new_tokens=T)
    ours = generate(_trimmed(model), ids, x["pixel_values"], mask, max_new_tokens=T, eos_token_id=NEVER)
    assert ours.tokens.tolist() == hf[:, ids.shape[1]:].tolist()
    trimmed = _trimmed(model, seed=2)
    left = generate(trimmed, ids, x["pixel_values"], mask, max_new_tokens=T, eos_token_id=NEVER, return_logits=True)
    right = generate(trimmed, x["input_ids"], x["pixel_values"], x["attention_mask"], max_new_tokens=T,
                     eos_token_id=NEVER, return_logits=True)
    assert torch.equal(left.tokens, right.tokens) and torch.equal(left.logits, right.logits)
    assert left.cache_lengths == right.cache_lengths and any(
        c < n for cs, n in zip(left.cache_lengths, left.prompt_lengths) for c in cs)  # trimming happened
    assert [s.tolist() for s in left.sequences(ids)] == [s.tolist() for s in right.sequences(x["input_ids"])]


def test_misuse_is_refused_by_name(adapter, model):
    from trimkit_llava import generate, prefill

    tmodel = _trimmed(model)
    x = adapter.example_inputs(model, 2, seed=3)
    ids, pixels, mask = x["input_ids"], x["pixel_values"], x["attention_mask"]
    assert not bool(mask.all())
    inside = mask.clone()
    inside[0, 1] = 0  # padding inside a prompt: neither left nor right padding
    with pytest.raises(ValueError, match=r"rows \[0\] of attention_mask are not right-padded"):
        generate(tmodel, ids, pixels, inside, max_new_tokens=2)
    left_ids, left = _left_padded(ids, mask)
    with pytest.raises(ValueError, match="left padding is not supported by the prefill"):
        prefill(tmodel, left_ids, pixels, left)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(tmodel, ids, pixels, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="2 images for 1 prompts"):
        generate(tmodel, ids[:1], pixels, mask[:1], max_new_tokens=2)
    with pytest.raises(ValueError, match="mode must be one of"):
        generate(tmodel, ids, pixels, mask, max_new_tokens=2, mode="padded")
    window = adapter.build(text_config={"sliding_window": 20})  # a Mistral-style decoder's window
    with pytest.raises(NotImplementedError, match="sliding window"):
        generate(_trimmed(window), ids, pixels, mask, max_new_tokens=8)
    with pytest.raises(TypeError, match="expected a trimmed LLaVA"):
        generate(model, ids, pixels, mask, max_new_tokens=2)
    tmodel.train()
    try:
        with pytest.raises(RuntimeError, match="training mode"):
            generate(tmodel, ids, pixels, mask, max_new_tokens=2)
    finally:
        tmodel.eval()
    # the cache hooks are removed after each call
    generate(tmodel, ids, pixels, mask, max_new_tokens=1)
    assert all(not layer.self_attn._forward_pre_hooks for layer in model.model.model.language_model.layers)


def _hf_beams(model, ids, pixels, mask, T, k, **kw):
    with torch.no_grad():
        out = model.model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=T,
                                   num_beams=k, do_sample=False, **kw)
    return out[:, ids.shape[1]:]


def test_beam_search_is_transformers_beam_search(adapter, model):
    """num_beams=3 with everything kept: transformers' generate(num_beams=3) tokens, alone and in a
    left-padded batch, without an EOS and with one that ends beams early (finished hypotheses, length
    penalty); trimmed: removed prefill == masked prefill, and the beams differ from greedy."""
    from trimkit_llava import generate

    x = adapter.example_inputs(model, 3, seed=11)
    T, k = 6, 3
    tmodel = _trimmed(model)
    pad = model.config.text_config.pad_token_id
    for b in range(3):
        ids, pixels = _alone(x, b)
        hf = _hf_beams(model, ids, pixels, torch.ones_like(ids), T, k, eos_token_id=None)
        ours = generate(tmodel, ids, pixels, max_new_tokens=T, num_beams=k, eos_token_id=NEVER)
        assert ours.tokens.tolist() == hf.tolist() and ours.generated == [T]
    left_ids, left = _left_padded(x["input_ids"], x["attention_mask"])
    hf = _hf_beams(model, left_ids, x["pixel_values"], left, T, k, eos_token_id=None)
    ours = generate(tmodel, left_ids, x["pixel_values"], left, max_new_tokens=T, num_beams=k, eos_token_id=NEVER)
    assert ours.tokens.tolist() == hf.tolist()
    greedy = generate(tmodel, left_ids, x["pixel_values"], left, max_new_tokens=T, eos_token_id=NEVER)
    assert ours.tokens.tolist() != greedy.tokens.tolist()  # beams found other sequences somewhere
    # an EOS that some beam reaches: finished hypotheses compete with running ones (length penalty 1.0)
    eos = int(ours.tokens[0, 2])
    for lp in (1.0, -0.5):
        hf = _hf_beams(model, left_ids, x["pixel_values"], left, T, k, eos_token_id=eos, pad_token_id=pad,
                       length_penalty=lp)
        got = generate(tmodel, left_ids, x["pixel_values"], left, max_new_tokens=T, num_beams=k, eos_token_id=eos,
                       pad_token_id=pad, length_penalty=lp)
        assert any(g < T for g in got.generated)  # some instance ended at its EOS
        for b, g in enumerate(got.generated):
            # transformers fills after the EOS with pad_token_id, or the EOS when the pad id is 0; ours: pad
            assert got.tokens[b, :g].tolist() == hf[b, :g].tolist() and bool(torch.isin(hf[b, g:], torch.tensor([pad, eos])).all())
            assert (got.tokens[b, g:] == pad).all() and (g == T or int(got.tokens[b, g - 1]) == eos)
    trimmed = _trimmed(model, seed=2)
    args = (x["input_ids"], x["pixel_values"], x["attention_mask"])
    removed = generate(trimmed, *args, max_new_tokens=T, num_beams=k, eos_token_id=NEVER)
    masked = generate(trimmed, *args, max_new_tokens=T, num_beams=k, eos_token_id=NEVER, mode="hard")
    assert removed.tokens.tolist() == masked.tokens.tolist()
    assert removed.cache_lengths == masked.cache_lengths and len(removed.cache_lengths) == 3
    with pytest.raises(ValueError, match="beam sampling"):
        generate(tmodel, *args, max_new_tokens=2, num_beams=2, do_sample=True)
    with pytest.raises(ValueError, match="apply to beam search"):
        generate(tmodel, *args, max_new_tokens=2, length_penalty=2.0)
