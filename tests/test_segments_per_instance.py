"""Segments whose boundaries differ per instance (``StreamSpec(segment_starts=...)``) and the
last-token summary (``summary="last"``).

The model is a decoder-style single stream written here from scratch, laid out as LLaVA's:
``[prompt][image tokens][question][padding]``, where the prompt and the question have a different
length in every instance, so the image starts at a different position per instance. Its image
tokens are placeholders in ``input_ids`` replaced by patch embeddings (``masked_scatter``), and its
embeddings also return where each segment starts, so the starts can come from an input or from a
module output. Attention is bidirectional with a key-padding bias (the packed engine refuses causal
masks); the point is the layout.
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_trimmers, shorter_rows
from toyvlm import Attention, ToyAdapter, _attn_inputs
from torch import nn

from trimkit import AttentionSpec, LayerSpec, ModelSpec, Segment, StreamSpec, TrimConfig, trim
from trimkit.plugins import get_registry

pytestmark = pytest.mark.usefixtures("one_thread")

PAD, IMG, BOS = 0, 1, 2
IMAGE = 4  # image tokens per instance (a 16x16 image, 8x8 patches)
SEGMENTS = ("prompt", "image", "question")
TARGETS = {"prompt": 0.7, "image": 0.5, "question": 0.6}


class Embed(nn.Module):
    """Token embeddings with the image placeholders replaced by patch embeddings; returns the
    sequence, its padding mask and the (B, 3) starts of prompt, image and question."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.word = nn.Embedding(40, dim)
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.pos = nn.Parameter(torch.randn(1, 32, dim) * 0.1)

    def forward(self, input_ids, attention_mask, pixel_values):
        x = self.word(input_ids)
        v = self.patch(pixel_values).flatten(2).transpose(1, 2)  # (B, IMAGE, D)
        is_image = (input_ids == IMG)[..., None].expand_as(x)
        x = x.masked_scatter(is_image, v) + self.pos[:, :input_ids.shape[1]]
        first = (input_ids == IMG).int().argmax(1)
        starts = torch.stack([torch.zeros_like(first), first, first + IMAGE], 1)
        return x, attention_mask, starts


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, bias):
        x = x + self.attn(self.n1(x), None, bias)
        return x + self.mlp(self.n2(x))


class PromptImageQuestion(nn.Module):
    """Returns every token's final states (B, N, D); ``segment_starts`` is only read by trimkit."""

    def __init__(self, dim=32, heads=4, depth=3):
        super().__init__()
        self.embed = Embed(dim)
        self.layers = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, input_ids, attention_mask, pixel_values, segment_starts=None):
        x, mask, _ = self.embed(input_ids, attention_mask, pixel_values)
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -1e9
        for layer in self.layers:
            x = layer(x, bias)
        return self.norm(x)


def make_inputs(prompts, questions, seed=0, pad_to=None):
    """A batch laid out [BOS + prompt][IMAGE placeholders][question][PAD...]; ``prompts``/``questions``:
    per-instance lengths (the prompt's with its BOS)."""
    g = torch.Generator().manual_seed(seed)
    B = len(prompts)
    N = pad_to or max(p + IMAGE + q for p, q in zip(prompts, questions))
    ids = torch.full((B, N), PAD, dtype=torch.long)
    mask = torch.zeros(B, N, dtype=torch.long)
    for b, (p, q) in enumerate(zip(prompts, questions)):
        ids[b, :p] = torch.randint(3, 40, (p,), generator=g)
        ids[b, 0] = BOS
        ids[b, p:p + IMAGE] = IMG
        ids[b, p + IMAGE:p + IMAGE + q] = torch.randint(3, 40, (q,), generator=g)
        mask[b, :p + IMAGE + q] = 1
    starts = torch.tensor([[0, p, p + IMAGE] for p in prompts])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(B, 3, 16, 16, generator=g),
            "segment_starts": starts}


class PerInstanceAdapter:
    """``starts``: where the segment starts come from: the input ``segment_starts`` or ``embed[2]``.
    ``shared``: describe fixed segment lengths instead (inputs must then have them)."""

    def __init__(self, starts: str | None = "segment_starts", question: str = "last", shared: tuple | None = None,
                 stream_summary: str | None = None) -> None:
        self.starts, self.question, self.shared, self.stream_summary = starts, question, shared, stream_summary

    def matches(self, m):
        return isinstance(m, PromptImageQuestion)

    def describe(self, m):
        attn = AttentionSpec("attn", "self", m.layers[0].attn.num_heads, out="out", inputs=_attn_inputs)
        if self.stream_summary is not None:  # one unsegmented stream
            stream = StreamSpec("seq", padding_input="attention_mask", summary=self.stream_summary)
        else:
            lengths = self.shared or (None, None, None)
            segments = [Segment("prompt", lengths[0]), Segment("image", lengths[1], summary="mean"),
                        Segment("question", lengths[2], summary=self.question)]
            stream = StreamSpec("seq", padding_input="attention_mask", segments=segments,
                                segment_starts=None if self.shared else self.starts)
        return ModelSpec([stream], [LayerSpec(f"layers.{i}", "seq", hidden_token_args={"bias": -1}, attentions=[attn])
                                    for i in range(len(m.layers))],
                         ["input_ids", "attention_mask", "pixel_values", "segment_starts"])

    def example_inputs(self, m, batch_size=1, seed=0):
        if self.shared:
            return make_inputs([self.shared[0]] * batch_size, [3 - b % 3 for b in range(batch_size)], seed,
                               pad_to=self.shared[0] + IMAGE + 3)
        return make_inputs([2 + (b * 3) % 5 for b in range(batch_size)], [1 + (b * 2) % 5 for b in range(batch_size)],
                           seed)

    def build(self, size="tiny", seed=0):
        torch.manual_seed(seed)
        return PromptImageQuestion().eval()


def _trim(name, adapter, seed=0, **config):
    get_registry().adapters.register(name, adapter, replace=True)
    model = adapter.build(seed=seed)
    return model, trim(model, TrimConfig(**({"token_target": TARGETS} | config)), adapter=name).eval()


@pytest.fixture(scope="module")
def per_instance():
    return _trim("pig_input", PerInstanceAdapter(), head_target=0.6)


# prompt lengths (BOS included) and question lengths that differ in every instance
PROMPTS, QUESTIONS = [2, 6, 3, 5], [5, 1, 4, 2]


def _hand_layout(x):
    """Per instance: the bounds [s0, s1, s2, N] and each segment's summary position by hand."""
    N = x["input_ids"].shape[1]
    out = []
    for b in range(x["input_ids"].shape[0]):
        s = x["segment_starts"][b].tolist() + [N]
        real = x["attention_mask"][b].tolist()
        last_q = max(p for p in range(s[2], N) if real[p])
        out.append((s, [s[0], s[1], last_q]))
    return out


def _run(tmodel, mode, x):
    with torch.no_grad(), tmodel.mode(mode):
        out = tmodel(**x)
    records = {r.key: r for r in tmodel.records}
    return out, records


def _kept_hard(records, x):
    """(B, N) real kept tokens after the last layer, from the masked forward's last token record."""
    last = [r for r in records.values() if r.kind == "token"][-1]
    return (last.mask > 0) & (x["attention_mask"] > 0)


def _one(x, b):
    return {k: v[b:b + 1] for k, v in x.items()}


def _assert_modes_agree(tmodel, x, dropped=None):
    """masked on the batch == removed at batch 1 for every instance == packed (and padded) on the batch,
    on every real kept token and every record."""
    hard, hrec = _run(tmodel, "hard", x)
    kept = _kept_hard(hrec, x)
    real = x["attention_mask"] > 0
    for b in range(x["input_ids"].shape[0]):
        one = _one(x, b)
        h1, h1rec = _run(tmodel, "hard", one)
        removed, rrec = _run(tmodel, "remove", one)
        index = [r for r in rrec.values() if r.kind == "token"][-1].index
        is_real = real[b, index]
        assert set(index[is_real].tolist()) == set(kept[b].nonzero().squeeze(1).tolist()), b
        torch.testing.assert_close(removed[0, is_real], hard[b, index[is_real]], atol=1e-4, rtol=0)
        torch.testing.assert_close(h1[0, kept[b]], hard[b, kept[b]], atol=1e-4, rtol=0)
        assert rrec.keys() == hrec.keys()
        for key, r in rrec.items():
            assert float(r.keep) == pytest.approx(float(hrec[key].keep[b]), abs=1e-6), (b, key)
            assert float(r.keep) == pytest.approx(float(h1rec[key].keep), abs=1e-6), (b, key)
            if dropped is not None and r.kind == "token" and float(r.keep) < 1:
                dropped.add(key.split(":")[-1])
    for mode in ("packed", "padded"):
        out, prec = _run(tmodel, mode, x)
        assert prec.keys() == hrec.keys()
        for key, r in prec.items():
            assert r.keep.tolist() == pytest.approx(hrec[key].keep.tolist(), abs=1e-6), (mode, key)
        assert torch.equal(tmodel.kept_mask("seq").sum(1), kept.sum(1))
        for b in range(x["input_ids"].shape[0]):  # each instance's real kept tokens first, in order
            n = int(kept[b].sum())
            torch.testing.assert_close(out[b, :n], hard[b, kept[b]], atol=1e-4, rtol=0, msg=f"{mode} {b}")
    return hrec


def test_nothing_trimmed_is_the_model(per_instance):
    """(a) Fresh trimmers keep every token: the trimmed model is the model, in every mode."""
    model, tmodel = per_instance
    x = make_inputs(PROMPTS, QUESTIONS, seed=1)
    with torch.no_grad():
        ref = model(**x)
        real = x["attention_mask"] > 0
        for mode in ("hard", "packed", "padded"):
            out, records = _run(tmodel, mode, x)
            if mode == "hard":
                torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
            else:  # padding dropped: each instance's real tokens first
                for b in range(len(PROMPTS)):
                    torch.testing.assert_close(out[b, :int(real[b].sum())], ref[b, real[b]], atol=1e-5, rtol=0)
            assert all(float(r.keep.min()) == 1 for r in records.values()), mode
        for b in range(len(PROMPTS)):
            out, _ = _run(tmodel, "remove", _one(x, b))
            torch.testing.assert_close(out, ref[b:b + 1], atol=1e-5, rtol=0)


def test_masked_removed_and_packed_agree_per_instance(per_instance):
    """(b) With random trimmers: masked == removed at batch 1 for every instance == packed, and tokens
    of every segment are dropped."""
    _, tmodel = per_instance
    saved = {k: v.clone() for k, v in tmodel.trimmers.state_dict().items()}
    dropped: set[str] = set()
    try:
        for seed in range(3):
            randomize_trimmers(tmodel, seed)
            _assert_modes_agree(tmodel, make_inputs(PROMPTS, QUESTIONS, seed=10 + seed), dropped)
    finally:
        tmodel.trimmers.load_state_dict(saved)
    assert dropped == set(SEGMENTS)


def test_each_instance_counts_its_own_segments_and_keeps_its_summaries(per_instance):
    """(c) Every record's keep fraction is the count, by hand, of that instance's own segment (from its
    own starts, padding excluded); every instance's summary tokens are kept. Shared bounds (instance 0's
    for all) give other counts: the check below would fail with them."""
    _, tmodel = per_instance
    saved = {k: v.clone() for k, v in tmodel.trimmers.state_dict().items()}
    differs = False
    try:
        for seed in range(3):
            randomize_trimmers(tmodel, 20 + seed)
            x = make_inputs(PROMPTS, QUESTIONS, seed=30 + seed)
            layout = _hand_layout(x)
            for mode in ("hard", "packed"):
                _, records = _run(tmodel, mode, x)
                hard = records if mode == "hard" else hard
                for i in range(3):
                    mask = hard[f"layers.{i}:prompt"].mask  # the stream's mask after layer i (masked forward)
                    for k, name in enumerate(SEGMENTS):
                        got = records[f"layers.{i}:{name}"].keep.tolist()
                        for b, (bounds, summary) in enumerate(layout):
                            def frac(s, e):
                                real = x["attention_mask"][b, s:e].float()
                                return float((mask[b, s:e] * real).sum() / real.sum().clamp_min(1))

                            assert got[b] == pytest.approx(frac(bounds[k], bounds[k + 1]), abs=1e-6), (mode, i, name, b)
                            s0 = layout[0][0]  # instance 0's bounds, as shared bounds would have it
                            differs |= abs(got[b] - frac(s0[k], s0[k + 1])) > 1e-6
                            assert float(mask[b, summary[k]]) == 1.0, (i, name, b)  # its summary token stays
            # packed: each instance's kept rows hold its summaries (the question's: its last real token)
            kept = tmodel.kept_mask("seq")
            index = [r for r in records.values() if r.kind == "token"][-1].index
            counts = [sum(records[f"layers.2:{g}"].counts[b] for g in SEGMENTS) for b in range(len(PROMPTS))]
            offsets = [sum(counts[:b]) for b in range(len(counts))]
            for b, (_, summary) in enumerate(layout):
                rows = set(index[offsets[b]:offsets[b] + counts[b]].tolist())
                assert set(summary) <= rows and int(kept[b].sum()) == counts[b]
    finally:
        tmodel.trimmers.load_state_dict(saved)
    assert differs


@pytest.mark.parametrize("mode", ["hard", "remove", "packed"])
def test_each_segment_reads_its_own_summaries(per_instance, mode):
    """Membership and summaries per instance: the prompt trimmer reads its BOS, the image trimmer the
    mean of that instance's image tokens, the question trimmer its last real token; each reads the mean
    of the other two as context."""
    model, tmodel = per_instance
    seen = []
    policies = tmodel.trimmers["layers_0"].token.policies
    hooks = [p.register_forward_pre_hook(lambda mod, args: seen.append(args)) for p in policies]
    x = make_inputs(PROMPTS, QUESTIONS, seed=5)
    batches = [_one(x, b) for b in range(len(PROMPTS))] if mode == "remove" else [x]
    try:
        with torch.no_grad(), tmodel.mode(mode):
            for batch in batches:
                tmodel(**batch)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        h, _, _ = model.embed(x["input_ids"], x["attention_mask"], x["pixel_values"])
    expected = []
    for b, (bounds, summary) in enumerate(_hand_layout(x)):
        expected.append(torch.stack([h[b, summary[0]], h[b, bounds[1]:bounds[2]].mean(0), h[b, summary[2]]]))
    expected = torch.stack(expected)  # (B, 3, D)
    got = [torch.cat([seen[j * 3 + k][1] for j in range(len(batches))]) for k in range(3)]
    ctx = [torch.cat([seen[j * 3 + k][2] for j in range(len(batches))]) for k in range(3)]
    for k in range(3):
        torch.testing.assert_close(got[k], expected[:, k], atol=1e-5, rtol=0)
        others = [j for j in range(3) if j != k]
        torch.testing.assert_close(ctx[k], expected[:, others].mean(1), atol=1e-5, rtol=0)


def test_starts_from_a_module_output():
    """``segment_starts="embed[2]"``: the starts the model's embeddings compute (the image placeholders'
    positions), not an input: the same decisions as from the input."""
    _, from_input = _trim("pig_input2", PerInstanceAdapter(), seed=3)
    _, from_module = _trim("pig_module", PerInstanceAdapter(starts="embed[2]"), seed=3)
    randomize_trimmers(from_input, 4)
    from_module.trimmers.load_state_dict(from_input.trimmers.state_dict())
    x = make_inputs(PROMPTS, QUESTIONS, seed=6)
    for mode in ("hard", "packed"):
        a, ra = _run(from_input, mode, x)
        b, rb = _run(from_module, mode, {**x, "segment_starts": None})
        torch.testing.assert_close(a, b)
        assert {k: r.keep.tolist() for k, r in ra.items()} == {k: r.keep.tolist() for k, r in rb.items()}
    _assert_modes_agree(from_module, x)
    assert "starts per instance from 'embed[2]'" in str(from_module.plan)


def test_training_mode_runs_and_is_differentiable(per_instance):
    """Mode sample (training) with per-instance bounds: the cost terms get gradients."""
    _, tmodel = per_instance
    x = make_inputs(PROMPTS, QUESTIONS, seed=8)
    tmodel.train()
    try:
        out = tmodel(**x)
        keep = torch.stack([r.keep for r in tmodel.records if r.kind == "token"])
        (out.square().mean() + keep.sum()).backward()
        grads = [p.grad for p in tmodel.trimmers["layers_1"].token.parameters() if p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    finally:
        tmodel.eval()
        tmodel.trimmers.zero_grad(set_to_none=True)


def test_plan_shows_per_instance_starts_and_last_summaries(per_instance):
    _, tmodel = per_instance
    text = str(tmodel.plan)
    assert ("seq: segments prompt, image (summary = mean of its kept tokens), question (summary = its last real "
            "token); starts per instance from input 'segment_starts'; each segment's first token always kept "
            "(its last real token where the summary is its last), padding from input 'attention_mask'") in text
    assert "tokens prompt keep 0.70, image keep 0.50, question keep 0.60" in text
    plan = tmodel.plan.streams[0]
    assert plan.starts == "input 'segment_starts'" and plan.segment_summaries == ("first", "mean", "last")


# --- summary="last" -------------------------------------------------------------------------------------

def _last_real(x):
    return [max(p for p, r in enumerate(row) if r) for row in x["attention_mask"].tolist()]


@pytest.mark.parametrize("which", ["shared", "stream"])
def test_last_token_summary_in_every_mode(which):
    """(d) ``Segment(summary="last")`` with shared lengths (the question's last real token still differs
    per instance: its padding does) and ``StreamSpec(summary="last")`` on an unsegmented stream: the
    trimmers read the last real token, it is always kept, and masked == removed == packed."""
    adapter = PerInstanceAdapter(shared=(3, IMAGE, None)) if which == "shared" else \
        PerInstanceAdapter(stream_summary="last")
    targets = TARGETS if which == "shared" else 0.5
    model, tmodel = _trim(f"pig_last_{which}", adapter, seed=2, token_target=targets)
    x = adapter.example_inputs(model, 3, seed=3) if which == "shared" else make_inputs([2, 6, 3], [2, 1, 5], 3)
    last = _last_real(x)
    assert len(set(last)) > 1  # the last real token is at a different position per instance
    seen = []
    token = tmodel.trimmers["layers_0"].token
    policy = token.policies[2] if which == "shared" else token
    hook = policy.register_forward_pre_hook(lambda mod, args: seen.append(args[1]))
    try:
        with torch.no_grad():
            tmodel(**x)  # fresh trimmers: the model
            h, _, _ = model.embed(x["input_ids"], x["attention_mask"], x["pixel_values"])
            torch.testing.assert_close(seen[0], h[torch.arange(3), last])
            assert not torch.allclose(seen[0], h[:, -1])
    finally:
        hook.remove()
    saved = {k: v.clone() for k, v in tmodel.trimmers.state_dict().items()}
    dropped: set[str] = set()
    try:
        for seed in range(3):
            randomize_trimmers(tmodel, seed)
            records = _assert_modes_agree(tmodel, x, dropped)
            kept = _kept_hard(records, x)
            assert all(bool(kept[b, p]) for b, p in enumerate(last))  # the summary survives every layer
            if which == "stream":
                assert all(bool(kept[b, 0]) for b in range(3))  # and so does the protected first token
    finally:
        tmodel.trimmers.load_state_dict(saved)
    assert dropped == (set(SEGMENTS) if which == "shared" else {"layers.0", "layers.1", "layers.2"})
    if which == "stream":
        assert "seq: summary = its last real token (it and the first token always kept), padding from input" in \
            str(tmodel.plan)
    else:
        assert "question (rest, summary = its last real token)" in str(tmodel.plan)


class LastTextAdapter(ToyAdapter):
    """tests' ToyVLM with a text stream summarised by its last real token (read as context by vision)."""

    def describe(self, model):
        spec = super().describe(model)
        text = StreamSpec("text", padding_input="attention_mask", summary="last")
        return ModelSpec([spec.streams[0], text], spec.layers, spec.input_names)

    def example_inputs(self, model, batch_size=1, seed=0):
        x = super().example_inputs(model, batch_size, seed)
        x["attention_mask"] = shorter_rows(batch_size, 7, step=2)
        return x


def test_a_stream_read_as_context_gives_its_last_token():
    """A two-stream model: the vision trimmers read the text's last real kept token as the other
    stream's summary, the same in every mode."""
    get_registry().adapters.register("toy_last_text", LastTextAdapter(), replace=True)
    adapter = LastTextAdapter()
    model = adapter.build()
    tmodel = trim(model, TrimConfig(token_target=0.5, head_target=0.6), adapter="toy_last_text").eval()
    randomize_trimmers(tmodel, 1)
    seen: dict[str, list] = {}
    hook = tmodel.trimmers["cross_v_1"].token.register_forward_pre_hook(
        lambda mod, args: seen.setdefault(mode, []).append(args[2]))
    try:
        x = adapter.example_inputs(model, 3, seed=2)
        with torch.no_grad():
            results = {}
            for mode in ("hard", "packed"):
                with tmodel.mode(mode):
                    results[mode] = (tmodel(**x), {r.key: r.keep.tolist() for r in tmodel.records})
            for b in range(3):
                mode = f"remove{b}"
                with tmodel.mode("remove"):
                    results[mode] = (tmodel(**_one(x, b)), {r.key: r.keep.tolist() for r in tmodel.records})
    finally:
        hook.remove()
    hard, hard_keep = results["hard"]
    assert min(min(v) for v in hard_keep.values()) < 1
    torch.testing.assert_close(results["packed"][0], hard, atol=1e-4, rtol=0)
    torch.testing.assert_close(seen["packed"][0], seen["hard"][0], atol=1e-4, rtol=0)
    for key, keep in results["packed"][1].items():
        assert keep == pytest.approx(hard_keep[key], abs=1e-6), key
    for b in range(3):
        out, keep = results[f"remove{b}"]
        torch.testing.assert_close(out[0], hard[b], atol=1e-4, rtol=0)
        torch.testing.assert_close(seen[f"remove{b}"][0][0], seen["hard"][0][b], atol=1e-4, rtol=0)
        for key, k in keep.items():
            assert k[0] == pytest.approx(hard_keep[key][b], abs=1e-6), (b, key)


# --- bad inputs and descriptions -------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["hard", "packed", "remove"])
@pytest.mark.parametrize("starts", [[0, 3, 40], [0, 5, 3], [1, 3, 8], [0, 3, 3]],
                         ids=["past-the-end", "decreasing", "not-from-0", "empty-segment"])
def test_starts_that_do_not_fit_the_sequence_are_refused(per_instance, mode, starts):
    _, tmodel = per_instance
    x = make_inputs(PROMPTS[:2], QUESTIONS[:2], seed=1)
    x["segment_starts"] = x["segment_starts"].clone()
    x["segment_starts"][-1] = torch.tensor(starts)
    if mode == "remove":
        x = _one(x, 1)
    with torch.no_grad(), tmodel.mode(mode), pytest.raises(
            ValueError, match=r"stream 'seq': segment_starts 'segment_starts' must give each instance's segments "
                              r"\['prompt', 'image', 'question'\] as starts that begin at 0"):
        tmodel(**x)
    with torch.no_grad(), tmodel.mode(mode):  # and the next forward is not affected
        tmodel(**make_inputs(PROMPTS[:1], QUESTIONS[:1], seed=2))


@pytest.mark.parametrize("bad, match", [
    (None, r"stream 'seq': StreamSpec.segment_starts input 'segment_starts' was not given \(None\): pass the "
           r"\(B, 3\) start of each segment \['prompt', 'image', 'question'\]"),
    (torch.tensor([[0, 3], [0, 7]]), r"gave torch.int64 \(2, 2\), expected a \(B, 3\) integer tensor"),
    (torch.tensor([[0.0, 3.0, 8.0], [0.0, 7.0, 11.0]]), r"gave torch.float32 \(2, 3\), expected a \(B, 3\) integer"),
    (torch.tensor([[0, 3, 8]]), r"stream 'seq': segment_starts 'segment_starts' has shape \(1, 3\), expected \(2, 3\)"),
], ids=["missing", "wrong-columns", "float", "wrong-batch"])
def test_a_missing_or_misshapen_starts_input_is_refused(per_instance, bad, match):
    _, tmodel = per_instance
    x = make_inputs(PROMPTS[:2], QUESTIONS[:2], seed=1) | {"segment_starts": bad}
    for mode in ("hard", "packed"):
        with torch.no_grad(), tmodel.mode(mode), pytest.raises(ValueError, match=match):
            tmodel(**x)


def test_bad_descriptions_are_refused():
    seg = [Segment("prompt"), Segment("image"), Segment("question")]
    with pytest.raises(ValueError, match=r"StreamSpec\('seq'\): segment_starts gives every segment's length per "
                                         r"instance; leave Segment.length unset \(given for \['prompt'\]\)"):
        StreamSpec("seq", segments=[Segment("prompt", 3)] + seg[1:], segment_starts="segment_starts")
    with pytest.raises(ValueError, match=r"not per segment \(given for \['image'\]\)"):
        StreamSpec("seq", segments=[seg[0], Segment("image", padding_input="m"), seg[2]], segment_starts="s")
    with pytest.raises(ValueError, match=r"StreamSpec\('seq'\).segment_starts: only a stream with segments"):
        StreamSpec("seq", segment_starts="segment_starts")
    with pytest.raises(ValueError, match="summary must be 'first', 'mean' or 'last'"):
        Segment("prompt", summary="final")
    with pytest.raises(ValueError, match="only the last segment may have length None"):
        StreamSpec("seq", segments=seg)  # without segment_starts, lengths are needed

    class Renamed(PerInstanceAdapter):
        def describe(self, m):
            spec = super().describe(m)
            return ModelSpec(spec.streams, spec.layers, spec.input_names[:3])  # starts not kept symbolic

    for adapter, match in (
            (PerInstanceAdapter(starts="starts"), r"StreamSpec\('seq'\).segment_starts 'starts' is neither a parameter "
                                                  r"of PromptImageQuestion.forward"),
            (PerInstanceAdapter(starts="embed[x]"), r"the index must be an output number"),
            (Renamed(), r"StreamSpec\('seq'\).segment_starts: input 'segment_starts' is not in ModelSpec.input_names")):
        get_registry().adapters.register("pig_bad", adapter, replace=True)
        with pytest.raises(ValueError, match=match):
            trim(adapter.build(), TrimConfig(token_target=0.5), adapter="pig_bad")
