"""Compute first, apply on request: `compute` leaves the model bit-identical (exceptions included),
an `Edit` applies, saves, loads and refuses other weights, and the edit stack stays with its model."""

import copy
import gc
import json
import weakref
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from editor import METHODS, AppliedEdit, Edit, EditOrderError, EditRequest, EditResult, LayerDelta, ROMEHParams
from editor import alphaedit, apply_saved, edit_stack, ft, memit, rome
from tracer.model import w_out, weights_hash

from .test_checks import FT_HP, HPS, stats_for
from .test_edit import REQ, TEMPLATE

FIXTURE = Path(__file__).parent / "fixtures" / "edit_rome_v1.safetensors"  # written by romelens before `compute`
TWO = [REQ, EditRequest(prompt=TEMPLATE, subject="Japan", target_new="Tokyo", target_true="Berlin")]
MODULES = {"rome": rome, "memit": memit, "ft-l": ft, "alphaedit": alphaedit}


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def same_state(model, snap):
    now = snapshot(model)
    return now.keys() == snap.keys() and all(torch.equal(now[k], snap[k]) for k in snap)


def outs(model):
    return [w_out(model, l).detach().clone() for l in range(model.cfg.n_layers)]


def hooks(model):
    """How many hooks each module has, after one forward pass: a TransformerLens 4 bridge adds
    its own on its first pass (and renews them on every pass, so their ids change)."""
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    return [(n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for n, m in model.named_modules()]


def compute(model, name, requests, tmp_path, **kw):
    return METHODS[name].compute(model, requests, HPS[name], stats=stats_for(model, name), cache_dir=tmp_path, **kw)


# ---------------------------------------------------------------- compute


@pytest.mark.parametrize("name", ["rome", "memit", "ft-l", "alphaedit"])
def test_compute_returns_an_edit_and_leaves_the_model_bit_identical(tiny_model, tmp_path, name):
    before, hooks0 = snapshot(tiny_model), hooks(tiny_model)
    whash = weights_hash(tiny_model)
    e = compute(tiny_model, name, TWO, tmp_path)
    assert same_state(tiny_model, before) and edit_stack(tiny_model) == [] and hooks(tiny_model) == hooks0
    assert isinstance(e, Edit) and e.method == name and e.requests == tuple(TWO)
    assert e.hparams is HPS[name] and e.model_hash == whash
    assert e.layers == tuple(sorted(e.deltas)) and all(isinstance(d, LayerDelta) for d in e.deltas.values())
    assert "after" not in e.diagnostics and e.diagnostics["before"]["new_first"].shape == (2,)
    what = {"rome": ("steps", "templates"), "memit": ("nll_curves", "layers", "templates"),
            "ft-l": ("nll_curve", "grad_norms"), "alphaedit": ("nll_curves", "layers", "templates", "nullspace")}[name]
    assert all(k in e.diagnostics for k in what)
    if name == "rome":  # two requests: rank-2 factors kept factored
        assert e.deltas[1].u.shape == (tiny_model.cfg.d_mlp, 2) and e.deltas[1].v.shape == (2, tiny_model.cfg.d_model)
        assert len(e.diagnostics["steps"]) == 2 and e.diagnostics["steps"][0]["nll_curve"]
    assert METHODS[name].compute is MODULES[name].compute


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("name", ["rome", "memit", "ft-l"])
def test_compute_that_raises_midway_leaves_the_model_bit_identical(tiny_model, tmp_path, monkeypatch, name):
    """The failure comes after the method wrote a temporary update (ROME: the first request's
    edit, seen by the second; MEMIT: layer 0's update, seen by layer 1; FT-L: mid-optimisation)."""
    before, hooks0 = snapshot(tiny_model), hooks(tiny_model)
    w0 = outs(tiny_model)
    seen = {}
    target, fail_on = {"rome": ("compute_delta", 2), "memit": ("subject_keys", 2), "ft-l": ("_nll", 3)}[name]
    real = getattr(MODULES[name], target)
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == fail_on:
            seen["changed"] = [l for l in range(tiny_model.cfg.n_layers) if not torch.equal(w_out(tiny_model, l), w0[l])]
            raise Boom(f"failure inside {name}'s computation")
        return real(*a, **k)

    monkeypatch.setattr(MODULES[name], target, failing)
    with pytest.raises(Boom):
        compute(tiny_model, name, TWO, tmp_path)
    if name != "ft-l":  # the failure happened while a temporary update was in the weights
        assert seen["changed"] == [0 if name == "memit" else 1]
    assert same_state(tiny_model, before) and edit_stack(tiny_model) == [] and hooks(tiny_model) == hooks0


# ---------------------------------------------------------------- apply, save, load


@pytest.mark.parametrize("name", ["rome", "memit", "ft-l"])
def test_computed_saved_loaded_applied_edit_gives_the_weights_of_edit(tiny_model, tmp_path, name):
    w0, h0 = outs(tiny_model), weights_hash(tiny_model)
    with METHODS[name].edit_many(tiny_model, TWO, HPS[name], stats=stats_for(tiny_model, name), cache_dir=tmp_path) as a:
        edited = outs(tiny_model)
        assert "after" in a.diagnostics and a.edit is not None and isinstance(a, AppliedEdit)
        assert a.model_hash == a.edit.model_hash == h0 and edit_stack(tiny_model) == [a]
    assert all(torch.equal(x, y) for x, y in zip(outs(tiny_model), w0))
    e = compute(tiny_model, name, TWO, tmp_path)
    path = e.save(tmp_path / f"{name}.safetensors")
    loaded = Edit.load(path)
    assert loaded.method == name and loaded.requests == e.requests and loaded.model_hash == e.model_hash
    assert loaded.hparams == HPS[name] and type(loaded.hparams) is type(HPS[name])  # rebuilt as the dataclass
    assert torch.equal(loaded.diagnostics["before"]["new_seq"], e.diagnostics["before"]["new_seq"])
    applied = loaded.apply(tiny_model)
    assert all(torch.equal(x, y) for x, y in zip(outs(tiny_model), edited))  # bit-identical to edit()
    assert applied.diagnostics["delta_ratio"].keys() == set(e.layers)  # went through apply_deltas
    assert "delta_ratio" not in e.diagnostics and "delta_ratio" not in loaded.diagnostics  # the Edit is untouched
    applied.restore()
    assert all(torch.equal(x, y) for x, y in zip(outs(tiny_model), w0)) and edit_stack(tiny_model) == []


def test_applied_restores_on_exit_exceptions_included(tiny_model, tmp_path):
    w0 = outs(tiny_model)
    e = compute(tiny_model, "ft-l", [REQ], tmp_path)
    with pytest.raises(Boom):
        with e.applied(tiny_model) as a:
            assert isinstance(a, EditResult) and edit_stack(tiny_model) == [a]  # EditResult is AppliedEdit
            assert not torch.equal(w_out(tiny_model, 1), w0[1])
            raise Boom
    assert all(torch.equal(x, y) for x, y in zip(outs(tiny_model), w0)) and edit_stack(tiny_model) == []
    with e.applied(tiny_model):  # an Edit applies again and again
        assert not torch.equal(w_out(tiny_model, 1), w0[1])
    assert torch.equal(w_out(tiny_model, 1), w0[1])


def test_apply_refuses_other_weights_unless_forced(tiny_model, tmp_path):
    w0 = outs(tiny_model)
    e1 = compute(tiny_model, "ft-l", [REQ], tmp_path)
    e2 = compute(tiny_model, "ft-l", [TWO[1]], tmp_path)  # both computed on the unedited model
    assert e1.model_hash == e2.model_hash
    a1 = e1.apply(tiny_model)
    w1 = outs(tiny_model)
    now = weights_hash(tiny_model)
    with pytest.raises(ValueError) as err:
        e2.apply(tiny_model)
    msg = str(err.value)
    assert e2.model_hash[:12] in msg and now[:12] in msg and "force=True" in msg and "weights hash" in msg
    assert all(torch.equal(x, y) for x, y in zip(outs(tiny_model), w1)) and edit_stack(tiny_model) == [a1]
    a2 = e2.apply(tiny_model, force=True)  # stacking edits computed on the same base model
    assert a2.model_hash == now and edit_stack(tiny_model) == [a1, a2]
    with pytest.raises(EditOrderError, match="last-in first-out"):
        a1.restore()
    a2.restore()
    a1.restore()
    assert all(torch.equal(x, y) for x, y in zip(outs(tiny_model), w0))


def test_apply_refuses_a_delta_that_does_not_fit(tiny_model):
    d, m = tiny_model.cfg.d_mlp, tiny_model.cfg.d_model
    before = snapshot(tiny_model)
    h = weights_hash(tiny_model)
    bad = Edit(method="rome", requests=[REQ], deltas={1: LayerDelta(u=torch.ones(d + 1, 1), v=torch.ones(1, m))},
               model_hash=h)
    with pytest.raises(ValueError, match="delta shape"):
        bad.apply(tiny_model)
    nan = Edit(method="rome", requests=[REQ], deltas={1: LayerDelta(u=torch.full((d, 1), float("nan")), v=torch.ones(1, m))},
               model_hash=h)
    with pytest.raises(ValueError, match="non-finite"):
        nan.apply(tiny_model)
    assert same_state(tiny_model, before) and edit_stack(tiny_model) == []
    with pytest.raises(ValueError, match="empty"):
        Edit(method="rome", requests=[REQ], deltas={}, model_hash=h)
    with pytest.raises(ValueError, match="u .* and v"):
        LayerDelta(u=torch.ones(d, 2), v=torch.ones(1, m))
    with pytest.raises(ValueError, match="not both"):
        LayerDelta(u=torch.ones(d, 1), v=torch.ones(1, m), dense=torch.ones(d, m))


def _legacy_save(a, path):
    """`EditResult.save` exactly as romelens wrote it before `compute` existed (format 1)."""
    from safetensors.torch import save_file

    tensors = {}
    for layer, d in a.deltas.items():
        if d.dense is not None:
            tensors[f"layer{layer}.dense"] = d.dense.detach().float().cpu().contiguous()
        else:
            tensors[f"layer{layer}.u"] = d.u.detach().float().cpu().contiguous()
            tensors[f"layer{layer}.v"] = d.v.detach().float().cpu().contiguous()
    diag = {k: {n: t.tolist() for n, t in v.items()} for k, v in a.diagnostics.items() if k in ("before", "after")}
    meta = {"format": "romelens-edit-1", "method": a.method, "model_name": a.model_name, "weights_hash": a.model_hash,
            "layers": json.dumps(list(a.layers)), "requests": json.dumps([r.to_dict() for r in a.requests]),
            "hparams": json.dumps(a.hparams, default=str), "diagnostics": json.dumps(diag)}
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("name", ["rome", "ft-l"])
def test_files_in_the_earlier_format_load_and_apply(tiny_model, tmp_path, name):
    w0 = outs(tiny_model)
    a = METHODS[name].edit(tiny_model, REQ, HPS[name], stats=stats_for(tiny_model, name), cache_dir=tmp_path)
    edited = outs(tiny_model)
    _legacy_save(a, tmp_path / "old.safetensors")
    a.restore()
    e = Edit.load(tmp_path / "old.safetensors")
    assert e.hparams == HPS[name] and e.requests == (REQ,)
    assert torch.equal(e.diagnostics["after"]["new_first"], a.diagnostics["after"]["new_first"].float())
    with e.applied(tiny_model):
        assert all(torch.equal(x, y) for x, y in zip(outs(tiny_model), edited))
    with apply_saved(tiny_model, tmp_path / "old.safetensors") as b:  # the thin wrapper
        assert isinstance(b, AppliedEdit) and all(torch.equal(x, y) for x, y in zip(outs(tiny_model), edited))
    assert all(torch.equal(x, y) for x, y in zip(outs(tiny_model), w0))


def test_a_file_written_before_compute_existed_loads():
    e = Edit.load(FIXTURE)  # romelens e270bad, TransformerLens 3.9 tiny model, rome.edit(...).save(...)
    assert e.method == "rome" and e.layers == (1,) and e.model_name == "custom"
    assert e.model_hash == "863b746602dd0ebd4934b6fc8d435203d8c7bff8d46badc78008c4f3a43a63e9"
    assert e.requests == (REQ,)
    assert e.deltas[1].u.shape == (64, 1) and e.deltas[1].v.shape == (1, 32) and e.deltas[1].u.dtype == torch.float32
    assert e.hparams == ROMEHParams(layer=1, v_lr=1.0, v_num_grad_steps=5, clamp_norm_factor=50.0, v_weight_decay=0.0,
                                    kl_factor=0.0, context_lengths=((4, 2),), key="r-rome")  # that commit's default
    assert e.diagnostics["after"]["new_first"][0] > e.diagnostics["before"]["new_first"][0]


def test_saved_hparams_that_no_longer_match_stay_a_dict(tiny_model, tmp_path):
    e = compute(tiny_model, "ft-l", [REQ], tmp_path)
    old = {k: v for k, v in asdict(e.hparams).items() if k != "early_stop_nll"}  # a field added later
    Edit(method="ft-l", requests=e.requests, deltas=e.deltas, hparams=old, model_hash=e.model_hash).save(tmp_path / "x")
    assert Edit.load(tmp_path / "x").hparams == old
    with pytest.raises(ValueError, match="not a file"):
        Edit.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable saved edit"):
        Edit.load(tmp_path / "junk.safetensors")


# ---------------------------------------------------------------- the edit stack


def test_deepcopy_carries_the_edited_weights_but_no_stack(tiny_model, tmp_path):
    w0 = outs(tiny_model)
    e = compute(tiny_model, "ft-l", [REQ], tmp_path)
    a = e.apply(tiny_model)
    edited = outs(tiny_model)
    twin = copy.deepcopy(tiny_model)
    assert edit_stack(twin) == [] and edit_stack(tiny_model) == [a]  # no undo objects pointing at the original
    assert all(torch.equal(x, y) for x, y in zip(outs(twin), edited))  # the copy holds the edited weights
    a.restore()  # restoring the original does not touch the copy
    assert all(torch.equal(x, y) for x, y in zip(outs(tiny_model), w0))
    assert all(torch.equal(x, y) for x, y in zip(outs(twin), edited))
    b = e.apply(twin, force=True)  # and an edit of the copy does not touch the original
    assert b.model is twin and edit_stack(tiny_model) == []
    b.restore()
    assert all(torch.equal(x, y) for x, y in zip(outs(twin), edited))
    assert all(torch.equal(x, y) for x, y in zip(outs(tiny_model), w0))


def test_restore_after_to_gives_the_unedited_weights_moved_or_cast(tiny_model, tmp_path):
    e = compute(tiny_model, "ft-l", [REQ], tmp_path)
    unedited = copy.deepcopy(tiny_model)
    a = e.apply(tiny_model)
    tiny_model.to("cpu")  # `.to` changes the same object: the stack stays
    assert edit_stack(tiny_model) == [a]
    tiny_model.to(torch.bfloat16)
    assert w_out(tiny_model, 1).dtype == torch.bfloat16
    a.restore()  # the float32 originals, written into the bf16 weights: as if the unedited model were cast
    unedited.to(torch.bfloat16)
    assert all(x.dtype == torch.bfloat16 and torch.equal(x, y) for x, y in zip(outs(tiny_model), outs(unedited)))
    assert edit_stack(tiny_model) == []


def test_the_stack_does_not_keep_a_model_alive(tokenizer, tmp_path):
    from tests.conftest import make_tiny_bridge, make_tiny_hooked
    from tracer.model import TL_API, prepare_model

    model = prepare_model(make_tiny_hooked(tokenizer) if TL_API == 3 else make_tiny_bridge(tokenizer)[0])
    e = compute(model, "ft-l", [REQ], tmp_path)
    a = e.apply(model)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None and not a.applied
    with pytest.raises(EditOrderError, match="no longer exists"):
        a.restore()


def test_edit_conveniences_check_one_request_and_the_registry_is_one_entry_per_method():
    assert [m.name for m in METHODS.values()] == list(METHODS)
    for name, m in METHODS.items():
        assert (m.compute, m.edit, m.edit_many) == (MODULES[name].compute, MODULES[name].edit, MODULES[name].edit_many)
    with pytest.raises(ValueError, match="one EditRequest"):
        ft.edit(None, TWO, FT_HP)


@pytest.mark.parametrize("name", ["rome", "memit", "ft-l"])
def test_every_compute_refuses_another_methods_hparams_before_anything_runs(tiny_model, tmp_path, name):
    other = HPS["ft-l" if name != "ft-l" else "rome"]
    w0 = outs(tiny_model)
    with pytest.raises(ValueError, match=rf"hparams .* has type {type(other).__name__}; expected {type(HPS[name]).__name__}"):
        METHODS[name].compute(tiny_model, TWO, other, cache_dir=tmp_path)
    assert all(torch.equal(x, y) for x, y in zip(outs(tiny_model), w0))
