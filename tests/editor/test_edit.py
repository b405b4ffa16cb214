"""ROME, MEMIT and FT-L on a tiny random model: edits move the target, undo is exact."""

from dataclasses import asdict

import pytest
import torch

from editor import METHODS, AlphaEditHParams, EditOrderError, EditRequest, FTHParams, MEMITHParams, ROMEHParams, apply_saved, edit_stack
from editor import ft, memit, rome
from tracer.model import w_out

# Random tiny models barely route information from earlier tokens to the last one, so the
# test requests put the subject last: the edited value sits where the target is predicted.
REQ = EditRequest(prompt="The capital city of {}", subject="France", target_new="Rome", target_true="Paris")
TEMPLATE = "The capital city of {}"
SUBJECTS = ["The Louvre", "Berlin", "Tokyo", "Apple", "Michael Jordan", "Toko Yasuda", "Danielle Darrieux",
            "The Colosseum", "France", "London"]
TARGETS = ["Rome", "Paris", "Tokyo", "Berlin", "London", "Japan", "Italy", "France", "Germany", "California"]

# Random tiny models need large, unregularised value moves to change their predictions.
ROME_HP = ROMEHParams(layer=1, v_lr=1.0, v_num_grad_steps=15, clamp_norm_factor=50.0, v_weight_decay=0.0,
                      kl_factor=0.0, context_lengths=((4, 2),))
MEMIT_HP = MEMITHParams(layers=(0, 1), v_lr=1.0, v_num_grad_steps=15, clamp_norm_factor=50.0, v_weight_decay=0.0,
                        kl_factor=0.0, context_lengths=((4, 2),), mom2_update_weight=1.0)


@pytest.fixture
def kw(tiny_model, tmp_path):
    eye = torch.eye(tiny_model.cfg.d_mlp)
    return {"cache_dir": tmp_path, "stats": eye}


def weights(model):
    return [w_out(model, l).detach().clone() for l in range(model.cfg.n_layers)]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_rome_raises_target_and_restores_bit_exact(tiny_model, kw):
    w0 = weights(tiny_model)
    e = rome.edit(tiny_model, REQ, ROME_HP, **kw)
    assert e.diagnostics["after"]["new_first"][0] > 1.5 * e.diagnostics["before"]["new_first"][0]
    assert not torch.equal(w_out(tiny_model, 1), w0[1])
    assert same(weights(tiny_model)[:1], w0[:1]) and same(weights(tiny_model)[2:], w0[2:])  # only the edit layer
    assert e.deltas[1].rank == 1
    e.restore()
    assert same(weights(tiny_model), w0)
    assert edit_stack(tiny_model) == []
    with pytest.raises(EditOrderError, match="not applied"):
        e.restore()


@pytest.mark.parametrize("key", ["r-rome", "original", "mean-key-shift"])
def test_rome_key_options_both_edit(tiny_model, kw, key):
    from dataclasses import replace

    with rome.edit(tiny_model, REQ, replace(ROME_HP, key=key), **kw) as e:
        assert e.diagnostics["after"]["new_first"][0] > e.diagnostics["before"]["new_first"][0]


def test_context_manager_restores_on_exception(tiny_model, kw):
    w0 = weights(tiny_model)
    with pytest.raises(RuntimeError, match="boom"):
        with rome.edit(tiny_model, REQ, ROME_HP, **kw):
            assert not same(weights(tiny_model), w0)
            raise RuntimeError("boom")
    assert same(weights(tiny_model), w0)


def test_out_of_order_restore_is_refused(tiny_model, kw):
    w0 = weights(tiny_model)
    e1 = rome.edit(tiny_model, REQ, ROME_HP, **kw)
    w1 = weights(tiny_model)
    e2 = rome.edit(tiny_model, EditRequest(prompt=TEMPLATE, subject="Japan", target_new="Tokyo"),
                   ROME_HP, **kw)
    with pytest.raises(EditOrderError, match="last-in first-out"):
        e1.restore()
    assert e1.applied and e2.applied
    e2.restore()
    assert same(weights(tiny_model), w1)
    e1.restore()
    assert same(weights(tiny_model), w0)


def test_edit_many_rome_is_one_restorable_result(tiny_model, kw):
    w0 = weights(tiny_model)
    reqs = [EditRequest(prompt=TEMPLATE, subject=s, target_new=t) for s, t in zip(SUBJECTS[:3], TARGETS[:3])]
    with rome.edit_many(tiny_model, reqs, ROME_HP, **kw) as e:
        assert e.deltas[1].rank == 3
        # the last edit is computed on the model with the others applied; with C = I on a random
        # model earlier edits may be overwritten, so only the last is required to hold
        assert e.diagnostics["after"]["new_first"][-1] > e.diagnostics["before"]["new_first"][-1]
    assert same(weights(tiny_model), w0)


def test_memit_ten_requests_raise_every_target(tiny_model, kw):
    w0 = weights(tiny_model)
    reqs = [EditRequest(prompt=TEMPLATE, subject=s, target_new=t) for s, t in zip(SUBJECTS, TARGETS)]
    stats = {l: kw["stats"] for l in (0, 1)}
    e = memit.edit_many(tiny_model, reqs, MEMIT_HP, stats=stats, cache_dir=kw["cache_dir"])
    before, after = e.diagnostics["before"]["new_seq"], e.diagnostics["after"]["new_seq"]
    assert (after > before).all(), (before, after)
    assert set(e.layers) == {0, 1}
    e.restore()
    assert same(weights(tiny_model), w0)


def test_memit_joint_spread_raises_every_target_and_edits_every_layer(tiny_model, kw):
    from dataclasses import replace

    w0 = weights(tiny_model)
    reqs = [EditRequest(prompt=TEMPLATE, subject=s, target_new=t) for s, t in zip(SUBJECTS, TARGETS)]
    stats = {l: kw["stats"] for l in (0, 1)}
    e = memit.edit_many(tiny_model, reqs, replace(MEMIT_HP, spread="joint"), stats=stats, cache_dir=kw["cache_dir"])
    before, after = e.diagnostics["before"]["new_seq"], e.diagnostics["after"]["new_seq"]
    assert (after > before).all(), (before, after)
    for l in (0, 1):  # both layers carry a share of the change
        assert not torch.equal(w_out(tiny_model, l), w0[l])
    info = e.diagnostics["layers"]
    assert info[-1]["resid_norm_after"] < info[0]["resid_norm"]
    e.restore()
    assert same(weights(tiny_model), w0)


def test_joint_value_optimisation_matches_single_layer_and_clamps_per_layer(tiny_model):
    from editor.optimize import optimize_values

    reqs = [EditRequest(prompt=TEMPLATE, subject=s, target_new=t) for s, t in zip(SUBJECTS[:3], TARGETS[:3])]
    kw = dict(templates=["{}"], kl_prompts=("{} is a",), steps=4, lr=0.5, weight_decay=0.1, kl_factor=0.1,
              early_stop_nll=0.0)
    one, c1 = optimize_values(tiny_model, reqs, layer=1, ref_norm=torch.ones(3), clamp_norm_factor=10.0, **kw)
    many, c2 = optimize_values(tiny_model, reqs, layer=(1,), ref_norm=torch.ones(3, 1), clamp_norm_factor=10.0, **kw)
    assert many.shape == (3, 1, tiny_model.cfg.d_model)
    assert torch.allclose(one, many[:, 0]) and c1 == c2
    ref = torch.tensor([[1.0, 0.2]] * 3)
    both, curve = optimize_values(tiny_model, reqs, layer=(0, 1), ref_norm=ref, clamp_norm_factor=1.0, **kw)
    assert (both.norm(dim=-1) <= ref * (1 + 1e-5)).all() and (both.norm(dim=-1) > 0).all()
    assert all(a < b for a, b in zip(curve[-1], curve[0]))
    with pytest.raises(ValueError, match="increasing"):
        optimize_values(tiny_model, reqs, layer=(1, 0), ref_norm=ref, clamp_norm_factor=1.0, **kw)
    with pytest.raises(ValueError, match="spread"):
        MEMITHParams(layers=(0,), spread="sideways")


def test_converged_requests_leave_the_batch_and_keep_their_own_optimisation(tiny_model, monkeypatch):
    """Requests in one value optimisation are independent: a request that reaches the
    early-stop threshold is frozen and its rows are no longer run, and each request ends
    with the delta and curve it gets when optimised alone."""
    import editor.optimize as opt

    reqs = [EditRequest(prompt=TEMPLATE, subject=s, target_new=t) for s, t in zip(SUBJECTS[:3], TARGETS[:3])]
    kw = dict(layer=1, templates=["{}", "A. {}"], kl_prompts=("{} is a",), steps=30, lr=0.5, weight_decay=0.1,
              kl_factor=0.1, clamp_norm_factor=10.0)
    free = opt.optimize_values(tiny_model, reqs, ref_norm=torch.ones(3), early_stop_nll=-1.0, **kw)[1]  # no stop
    lowest = sorted(min(c[i] for c in free) for i in range(3))
    threshold = (lowest[0] + lowest[-1]) / 2  # one request gets below it, another never does
    rows_seen = []
    logits = opt._logits
    monkeypatch.setattr(opt, "_logits", lambda m, b, *a: rows_seen.append(len(b.row_req)) or logits(m, b, *a))
    delta, curve = opt.optimize_values(tiny_model, reqs, ref_norm=torch.ones(3), early_stop_nll=threshold, **kw)
    monkeypatch.undo()
    steps = [next(s for s, c in enumerate(curve) if c[i] < threshold) if any(c[i] < threshold for c in curve)
             else None for i in range(3)]
    assert len({s for s in steps}) > 1, steps  # the threshold separates them
    assert rows_seen[1] == 3 * 3 and min(rows_seen) < 3 * 3  # 3 requests x (2 templates + 1 KL prompt), then fewer
    for i, r in enumerate(reqs):
        d1, c1 = opt.optimize_values(tiny_model, [r], ref_norm=torch.ones(1), early_stop_nll=threshold, **kw)
        assert torch.allclose(delta[i], d1[0], atol=1e-5)
        assert [c[i] for c in curve][: len(c1)] == pytest.approx([c[0] for c in c1], abs=1e-4)
        assert all(c[i] == curve[len(c1) - 1][i] for c in curve[len(c1):])  # frozen: its last NLL is repeated


@pytest.mark.parametrize("layer", [1, (0, 1)])
def test_value_optimisation_from_the_subject_on_matches_running_every_position(tiny_model, layer, monkeypatch):
    """With a key/value cache (TransformerLens 3.x) each step runs only from each row's last
    subject token on; the deltas and curves match the all-positions run within float rounding."""
    import editor.optimize as opt
    from tracer.model import prefix_kv_cache

    reqs = [EditRequest(prompt=TEMPLATE, subject=s, target_new=t) for s, t in zip(SUBJECTS[:3], TARGETS[:3])]
    n_layers = 1 if isinstance(layer, int) else len(layer)
    kw = dict(layer=layer, templates=["{}", "A long context sentence here. {}", "B. {}"], kl_prompts=("{} is a",),
              steps=6, lr=0.5, weight_decay=0.1, kl_factor=0.1, clamp_norm_factor=10.0, early_stop_nll=0.5,
              ref_norm=torch.ones(3, n_layers) if n_layers > 1 else torch.ones(3))
    widths = []
    resume = opt.resume_with_prefix
    monkeypatch.setattr(opt, "resume_with_prefix", lambda m, x, **k: widths.append(x.shape[1]) or resume(m, x, **k))
    fast, c_fast = opt.optimize_values(tiny_model, reqs, **kw)
    slow, c_slow = opt.optimize_values(tiny_model, reqs, use_prefix_cache=False, **kw)
    assert torch.allclose(fast, slow, atol=1e-5), (fast - slow).abs().max()
    assert torch.allclose(torch.tensor(c_fast), torch.tensor(c_slow), atol=1e-4)
    if prefix_kv_cache(tiny_model, 1) is not None:  # TransformerLens 3.x: suffixes only were run
        assert widths and max(widths) < opt._build(tiny_model, reqs, kw["templates"], kw["kl_prompts"], "cpu").tokens.shape[1]
    else:
        assert not widths


def test_ft_l_raises_target_and_respects_bound(tiny_model):
    w0 = weights(tiny_model)
    hp = FTHParams(layer=1, lr=1e-2, norm_constraint=0.05, num_steps=10)
    with ft.edit(tiny_model, REQ, hp) as e:
        assert e.diagnostics["after"]["new_first"][0] > e.diagnostics["before"]["new_first"][0]
        assert e.deltas[1].dense.abs().max() <= 0.05 + 1e-7
        grads = e.diagnostics["grad_norms"]
        assert len(grads) == tiny_model.cfg.n_layers and all(g > 0 for g in grads)
    assert same(weights(tiny_model), w0)


def test_save_then_apply_saved_reproduces_weights(tiny_model, kw, tmp_path):
    w0 = weights(tiny_model)
    e = rome.edit(tiny_model, REQ, ROME_HP, **kw)
    edited = weights(tiny_model)
    path = e.save(tmp_path / "edit.safetensors")
    e.restore()
    e2 = apply_saved(tiny_model, path)
    assert same(weights(tiny_model), edited)
    assert e2.requests == (REQ,)
    with pytest.raises(ValueError, match="weights hash"):
        apply_saved(tiny_model, path)  # the model is now edited: a different model
    e2.restore()
    assert same(weights(tiny_model), w0)


def test_memit_save_apply(tiny_model, kw, tmp_path):
    reqs = [EditRequest(prompt=TEMPLATE, subject=s, target_new=t) for s, t in zip(SUBJECTS[:4], TARGETS[:4])]
    stats = {l: kw["stats"] for l in (0, 1)}
    e = memit.edit_many(tiny_model, reqs, MEMIT_HP, stats=stats, cache_dir=kw["cache_dir"])
    edited = weights(tiny_model)
    path = e.save(tmp_path / "m.safetensors")
    e.restore()
    with apply_saved(tiny_model, path):
        assert same(weights(tiny_model), edited)


def test_registry_uniform_signature(tiny_model, kw):
    assert set(METHODS) == {"rome", "memit", "ft-l", "alphaedit"}
    hps = {"rome": ROME_HP, "memit": MEMIT_HP, "ft-l": FTHParams(layer=1, num_steps=2),
           "alphaedit": AlphaEditHParams(**asdict(MEMIT_HP), nullspace_threshold=2.0)}
    w0 = weights(tiny_model)
    for name, m in METHODS.items():
        assert isinstance(hps[name], m.HParams)
        layered = {"stats": {0: kw["stats"], 1: kw["stats"]}}
        extra = {"memit": layered, "alphaedit": layered}.get(name, {"stats": kw["stats"]})
        with m.edit_many(tiny_model, [REQ], hps[name], cache_dir=kw["cache_dir"], **extra) as e:
            assert e.method == name
    assert same(weights(tiny_model), w0)


def test_bad_inputs(tiny_model, kw):
    with pytest.raises(ValueError, match="layer"):
        rome.edit(tiny_model, REQ, ROMEHParams(layer=9), **kw)
    with pytest.raises(ValueError, match="stats shape"):
        rome.edit(tiny_model, REQ, ROME_HP, stats=torch.eye(3), cache_dir=kw["cache_dir"])
    with pytest.raises(ValueError, match="one EditRequest"):
        rome.edit(tiny_model, [REQ, REQ], ROME_HP, **kw)
    with pytest.raises(ValueError, match="key"):
        ROMEHParams(layer=1, key="new")
    with pytest.raises(ValueError, match="not found"):
        rome.edit(tiny_model, EditRequest(prompt="{} is in", subject="Zzqx", target_new="Rome"), ROME_HP, **kw) if False else \
            __import__("tracer").locate_subject(tiny_model, "The Louvre is in", "Eiffel")


def test_stats_from_cache_dir(tiny_model, tmp_path):
    from tests.conftest import CORPUS

    corpus = tmp_path / "c.txt"  # varied text: one sentence repeated gave a singular C on the 4.x bridge
    corpus.write_text("\n".join(CORPUS) * 10)
    from dataclasses import replace

    hp = replace(ROME_HP, mom2_n_tokens=300)
    with rome.edit(tiny_model, REQ, hp, corpus=str(corpus), cache_dir=tmp_path / "cache") as e:
        assert e.diagnostics["after"]["new_first"][0] > e.diagnostics["before"]["new_first"][0]
    assert list((tmp_path / "cache" / "stats").rglob("*.safetensors"))
    assert list((tmp_path / "cache" / "context").rglob("*.json"))


class _RMSNorm(torch.nn.Module):  # Gemma-style post-MLP norm: scale invariant, elementwise gain
    def __init__(self, d):
        super().__init__()
        self.g = torch.nn.Parameter(1.0 + 0.5 * torch.rand(d, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return self.g * x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()


def test_raw_change_through_a_post_norm_reaches_reachable_targets_and_stays_bounded():
    from editor.memit import _raw_change

    torch.manual_seed(0)
    norm, raw = _RMSNorm(16), torch.randn(3, 16) * 50
    # reachable: the output of another input
    other = raw + torch.randn(3, 16) * 20
    r = _raw_change(norm, raw, norm(other).detach() - norm(raw).detach())
    assert torch.allclose(norm(raw + r), norm(other), atol=1e-3)
    # unreachable (far off the norm's output surface): finite, same raw scale, and closer than before
    want = torch.randn(3, 16) * 1e3
    r = _raw_change(norm, raw, want)
    assert torch.isfinite(r).all()
    assert torch.allclose((raw + r).norm(dim=-1), raw.norm(dim=-1), rtol=1e-4)
    target = norm(raw).detach() + want
    assert ((norm(raw + r) - target).norm(dim=-1) < (norm(raw) - target).norm(dim=-1)).all()


def test_raw_change_survives_a_float32_svd_that_does_not_converge(monkeypatch):
    # zsRE, MEMIT, 100 requests on Gemma-3-270m: linalg.svd failed to converge on one row's
    # Jacobian and the whole sequential run died; the float64 retry gives the same step.
    from editor.memit import _raw_change

    torch.manual_seed(0)
    norm, raw = _RMSNorm(16), torch.randn(3, 16) * 50
    other = raw + torch.randn(3, 16) * 20
    resid = norm(other).detach() - norm(raw).detach()
    expected = _raw_change(norm, raw, resid)
    pinv = torch.linalg.pinv

    def fails_in_float32(a, *args, **kwargs):
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return pinv(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "pinv", fails_in_float32)
    r = _raw_change(norm, raw, resid)
    assert torch.allclose(r, expected, atol=1e-3) and torch.allclose(norm(raw + r), norm(other), atol=1e-3)


def test_memit_lambda_scales_with_d_mlp(tiny_model, monkeypatch):
    from editor import hparams

    assert hparams.scaled_lambda(hparams.GPTJ_D_MLP) == MEMITHParams(layers=(0,)).mom2_update_weight
    assert hparams.memit_hparams("gemma-3-270m").mom2_update_weight == hparams.scaled_lambda(640 * 16 // 5)  # d_mlp 2048
    monkeypatch.setattr(hparams, "default_layer", lambda m, **kw: 2)
    hp = hparams.memit_hparams(tiny_model)  # no preset: five layers up to the chosen one, λ for its d_mlp
    assert hp.layers == (0, 1, 2) and hp.mom2_update_weight == pytest.approx(15000 * tiny_model.cfg.d_mlp / 16384)
    assert hp.spread == "residual"  # no post-MLP norm: the paper's spread
    import tracer.model

    monkeypatch.setattr(tracer.model, "mlp_post_norm", lambda model, layer: torch.nn.Identity())
    hp = hparams.memit_hparams(tiny_model)  # a Gemma-style model without a preset
    assert hp.spread == "joint" and hp.clamp_norm_factor == 0.5


def test_default_layer_and_the_editors_keep_the_choice_under_the_callers_cache_dir(tiny_model, tmp_path, monkeypatch):
    import json
    from types import SimpleNamespace

    import tracer.layer
    from editor import hparams

    facts = [{"known_id": i, "prompt": p, "subject": s, "attribute": None} for i, (p, s) in
             enumerate([("The Eiffel Tower is located in the city of", "Eiffel Tower"), ("Tokyo is the capital of", "Tokyo")])]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "known_1000.json").write_text(json.dumps(facts))
    monkeypatch.setenv("ROMELENS_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("ROMELENS_CACHE", str(tmp_path / "default"))
    mine = tmp_path / "mine"
    layer = hparams.default_layer(tiny_model, n=2, cache_dir=mine)  # traces: the choice and the noise stats
    assert sorted(p.parent.name for p in mine.rglob("*.json")) == ["edit_layer", "noise"]
    assert not (tmp_path / "default").exists()

    def must_not_trace(*a, **k):
        raise AssertionError("traced although a choice is cached")

    monkeypatch.setattr(tracer.layer, "choose_edit_layer", must_not_trace)
    assert hparams.default_layer(tiny_model, cache_dir=mine) == layer  # read back from there
    # the presets and rome.compute pass their cache_dir on (before, they read the default root)
    other = 0 if hparams._fallback_layer(tiny_model.cfg.n_layers) != 0 else 2
    tracer.layer.save_layer_choice(tiny_model, SimpleNamespace(layer=other), cache_dir=mine)
    assert hparams.rome_hparams(tiny_model, cache_dir=mine).layer == other
    assert hparams.memit_hparams(tiny_model, cache_dir=mine).layers[-1] == other
    assert hparams.ft_hparams(tiny_model, cache_dir=mine).layer == other
    e = rome.compute(tiny_model, REQ, stats=torch.eye(tiny_model.cfg.d_mlp), cache_dir=mine)
    assert e.layers == (other,) and not (tmp_path / "default").exists()


def test_default_layer_warns_traces_once_and_caches_on_disk_only(tiny_model, monkeypatch, tmp_path, caplog):
    import logging
    from types import SimpleNamespace

    import tracer.layer
    from editor import hparams

    facts = tmp_path / "known_1000.json"
    facts.write_text("[]")
    monkeypatch.setenv("ROMELENS_DATA", str(tmp_path))  # the facts path: $ROMELENS_DATA/known_1000.json
    calls = []

    def fake_choose(model, facts, **kw):
        calls.append((facts, kw["n"]))
        return SimpleNamespace(layer=1, curve=[0.1, 0.3], n_facts=kw["n"])

    monkeypatch.setattr(tracer.layer, "choose_edit_layer", fake_choose)
    monkeypatch.setattr(tracer.layer, "estimate_minutes", lambda model, n: 9.0)
    with caplog.at_level(logging.WARNING, logger="editor.hparams"):
        assert hparams.default_layer(tiny_model, cache_dir=tmp_path) == 1
    assert calls == [(str(facts), 100)]
    text = caplog.text
    assert "causal tracing over 100 known facts" in text and "~9 min on this machine" in text  # the cost
    assert "ROMEHParams(layer=...)" in text and "tracer.choose_edit_layer" in text  # how to skip it
    assert not hasattr(hparams, "_CHOSEN_LAYERS")  # no module-level memory: the disk is the cache
    (cached,) = (tmp_path / "edit_layer").iterdir()
    assert hparams.default_layer(tiny_model, cache_dir=tmp_path) == 1 and len(calls) == 1  # read from disk
    cached.write_text("{not json")  # corrupt: traced again, never used
    assert hparams.default_layer(tiny_model, cache_dir=tmp_path) == 1 and len(calls) == 2
    assert hparams.default_layer(tiny_model, cache_dir="none") == 1 and len(calls) == 3  # caching off
    assert hparams.default_layer(tiny_model, facts=facts, n=20, cache_dir="none") == 1 and calls[-1] == (str(facts), 20)

    def broken(model, facts, **kw):
        raise RuntimeError("tracing broke")

    monkeypatch.setattr(tracer.layer, "choose_edit_layer", broken)
    fallback = hparams.default_layer(tiny_model, cache_dir=tmp_path / "other")
    assert fallback == round(tiny_model.cfg.n_layers * 17 / 48) and not (tmp_path / "other").exists()
    monkeypatch.setenv("ROMELENS_DATA", str(tmp_path / "no-data"))  # no facts: fallback without tracing
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="editor.hparams"):
        assert hparams.default_layer(tiny_model, cache_dir=tmp_path / "other") == fallback
    assert "no known-facts file" in caplog.text
