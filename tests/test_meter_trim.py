"""The issue's user story on METER: trim, train-mode forward with cost terms, eval with removal."""

import torch
from trimkit_meter import build_meter, meter_example_inputs
from trimkit_smarttrim import cost_loss

from trimkit import TrimConfig, trim
from trimkit.macs import count_macs
from trimkit.plugins import select_adapter


def test_meter_user_story():
    torch.manual_seed(0)
    model = build_meter("tiny")
    assert select_adapter(model) == "meter"  # found through the plugin system
    tmodel = trim(model, TrimConfig(token_target={"vision": 0.5, "text": 0.8}, head_target=0.6))
    batch = meter_example_inputs(model, batch_size=3, seed=0)
    tmodel.train()
    out = tmodel(**batch)
    assert out.shape == (3, model.config.num_labels)
    targets = {r.key: r.target for r in tmodel.records}
    assert targets["cross_modal_image_layers.0"] == 0.5 and targets["cross_modal_text_layers.0"] == 0.8
    assert targets["cross_modal_text_layers.0.1"] == 0.6
    cost = cost_loss(tmodel.records)
    assert cost.requires_grad and cost.item() > 0  # stable init keeps ~all: far from the targets
    (out.sum() + cost).backward()

    tmodel.eval()
    one = meter_example_inputs(model, batch_size=1, seed=1)
    with torch.no_grad():
        for p in tmodel.trimmers.parameters():
            p.normal_(0, 0.5)
        with tmodel.mode("hard"):
            masked = tmodel(**one)
        removed = tmodel(**one)  # eval at batch 1: physical removal
    torch.testing.assert_close(removed, masked, atol=1e-5, rtol=1e-4)
    with tmodel.full():
        full_macs = count_macs(tmodel, **one).total
    trimmed_macs = count_macs(tmodel, **one).total
    assert trimmed_macs < full_macs


def test_trimmer_overhead_is_reported():
    model = build_meter("tiny")
    tmodel = trim(model, TrimConfig())
    assert 0 < tmodel.trimmer_parameters() < tmodel.backbone_parameters()


def test_save_and_load_round_trip(tmp_path):
    import pytest

    from trimkit import load_trimmed

    torch.manual_seed(0)
    model = build_meter("tiny")
    tmodel = trim(model, TrimConfig(token_target=0.5))
    with torch.no_grad():
        for p in tmodel.trimmers.parameters():
            p.normal_(0, 0.5)
    tmodel.eval()
    x = meter_example_inputs(model, batch_size=1, seed=2)
    with torch.no_grad():
        ref = tmodel(**x)
    tmodel.save_pretrained(tmp_path / "ckpt", include_backbone=True)
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"trim_config.json", "trimmers.safetensors",
                                                                "backbone.safetensors", "README.md"}
    torch.manual_seed(1)
    restored = load_trimmed(tmp_path / "ckpt", build_meter("tiny")).eval()  # different random init
    with torch.no_grad():
        torch.testing.assert_close(restored(**x), ref)
    with pytest.raises(ValueError, match="does not match the model"):  # a checkpoint for another model
        load_trimmed(tmp_path / "ckpt", build_meter("tiny", cross_layers=1))
    with pytest.raises(ValueError, match="pixel_values_2"):
        tmodel(**x, pixel_values_2=x["pixel_values"])


def test_tensors_the_graph_reads_by_attribute_follow_the_models():
    """The rewritten graph reads some parameters by attribute (METER's [CLS] and position embeddings);
    fx keeps its own references to them. When the model's modules get new tensor objects (here
    ``load_state_dict(assign=True)``; FSDP does it around every step) the trimmed forward must use
    the new ones, not a stale copy (which would also leave the optimizer's parameters unused)."""
    torch.manual_seed(0)
    config = TrimConfig(token_target=0.5, head_target=0.6)
    model = build_meter("tiny")
    tmodel = trim(model, config).eval()
    one = meter_example_inputs(model, batch_size=1, seed=1)
    read = [n.target for n in tmodel._graph.graph.nodes if n.op == "get_attr"]
    assert any("embedding" in t for t in read)  # the case this test is about is present
    with torch.no_grad():
        before = tmodel(**one)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for t in read:
            state[t] = state[t] + torch.randn_like(state[t])
        model.load_state_dict(state, assign=True)
        after = tmodel(**one)
        fresh = trim(model, config).eval()  # traced on the new tensors, same trimmers
        fresh.trimmers.load_state_dict(tmodel.trimmers.state_dict())
        reference = fresh(**one)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, reference, atol=0, rtol=0)


def test_borrowed_modules_are_registered_once_and_copied_with_the_model():
    """Rewritten layers, attention wrappers and the root graph reference the backbone's modules
    (trimkit.refs): every parameter is listed once, under model.* or trimmers.*, and a deep copy's
    wrappers call the copy's modules (not the original's, which would train the wrong weights)."""
    import copy

    from trimkit.layer import TrimmedLayer
    from trimkit.ops import TrimAttention

    torch.manual_seed(0)
    tmodel = trim(build_meter("tiny"), TrimConfig(token_target=0.5, head_target=0.5))
    names = [n for n, _ in tmodel.named_parameters(remove_duplicate=False)]
    assert len(names) == len(set(names)) == len({id(p) for p in tmodel.parameters()})
    assert all(n.startswith(("model.", "trimmers.")) for n in tmodel.state_dict())
    layers = [m for m in tmodel._graph.modules() if isinstance(m, TrimmedLayer)]
    attns = [m for m in tmodel._graph.modules() if isinstance(m, TrimAttention)]
    assert layers and attns
    own = {id(m) for m in tmodel.model.modules()}
    assert all(id(l.layer) in own for l in layers) and all(id(a.module) in own for a in attns)
    assert {id(l.trimmers) for l in layers} <= {id(t) for t in tmodel.trimmers.values()}
    twin = copy.deepcopy(tmodel)
    twin_own = {id(m) for m in twin.model.modules()}
    twin_layers = [m for m in twin._graph.modules() if isinstance(m, TrimmedLayer)]
    assert all(id(l.layer) in twin_own for l in twin_layers)
    assert all(id(a.module) in twin_own for a in twin._graph.modules() if isinstance(a, TrimAttention))
    x = meter_example_inputs(tmodel.model, batch_size=2, seed=0)
    tmodel.eval(), twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(**x), tmodel(**x), atol=0, rtol=0)
        for p in twin.model.parameters():
            p.add_(0.1)
        assert not torch.allclose(twin(**x), tmodel(**x))  # the copy runs its own weights


def test_layers_without_trimmers_run_on_the_kept_tokens_without_deciding():
    """Sparse placement (one token trimmer, at the first vision block; no head trimmers): mode remove makes
    one decision, and every vision block's attention runs on the tokens that decision kept (the decision
    is taken at the first block's input). Guards: that only the trimmed layer goes through the decision
    path, that the blocks really see fewer tokens than in the masked forward, that the result is the
    masked forward's, and that the full model is untouched."""
    from unittest import mock

    from trimkit.ops import TrimAttention

    torch.manual_seed(0)
    model = build_meter("tiny").eval()
    tmodel = trim(model, TrimConfig(token_layers=["vision.uni.0"], token_target=0.5, trim_heads=False)).eval()
    block_of = {id(blk.attn): i for i, blk in enumerate(model.vit_model.transformer.resblocks)}
    seen: dict[int, int] = {}  # vision block -> tokens its attention was called with in the last forward
    forward = TrimAttention.forward

    def spy(self, *args, **kwargs):
        if id(self.module) in block_of:
            seen[block_of[id(self.module)]] = args[0].shape[1]
        return forward(self, *args, **kwargs)

    from trimkit.layer import TrimmedLayer

    decided: list[str] = []  # layers that took the decision path (a [CLS] context for trimmers) in mode remove
    context = TrimmedLayer._cls_context

    def deciding(self, *args, **kwargs):
        decided.append(self.spec.path)
        return context(self, *args, **kwargs)

    one = meter_example_inputs(model, batch_size=1, seed=1)
    with torch.no_grad(), mock.patch.object(TrimAttention, "forward", spy), \
            mock.patch.object(TrimmedLayer, "_cls_context", deciding):
        for p in tmodel.trimmers.parameters():
            p.normal_(0, 0.5)
        with tmodel.full():
            full = tmodel(**one)
        with tmodel.mode("hard"):
            masked = tmodel(**one)
        masked_seen = dict(seen)
        seen.clear()
        decided.clear()
        removed = tmodel(**one)  # eval at batch 1: physical removal
    # only the layer with a trimmer went through the decision (summary, logits, host sync); the rest skipped it
    assert len(decided) == 1, decided
    records = [r for r in tmodel.records if r.kind == "token"]
    assert len(records) == 1 and float(records[0].keep) < 1.0  # one decision, and it dropped tokens
    n = masked_seen[0]  # masks keep every token in place
    kept = round(float(records[0].keep) * n)
    assert sorted(seen) == sorted(masked_seen) == sorted(block_of.values())
    assert all(masked_seen[i] == n for i in masked_seen)
    assert all(seen[i] == kept < n for i in seen)  # every block ran on the kept tokens
    torch.testing.assert_close(removed, masked, atol=1e-5, rtol=1e-4)
    assert (removed - full).abs().max() > 1e-4
