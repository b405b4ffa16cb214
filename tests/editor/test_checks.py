"""Silent failures found in other editing libraries, on a tiny random model: each is either made
to work (half precision) or refused before any weight changes, for every method."""

import inspect
import logging
from dataclasses import asdict, replace

import pytest
import torch

from editor import METHODS, AlphaEditHParams, EditRequest, FTHParams, MEMITHParams, ROMEHParams, apply_saved, edit_stack
from editor import alphaedit, ft, memit, rome
from editor.result import LayerDelta, apply_deltas
from editor.stats import compute_stats, layer_stats
from tracer.model import w_out

from .test_edit import MEMIT_HP, REQ, ROME_HP, TEMPLATE

FT_HP = FTHParams(layer=1, lr=1e-2, norm_constraint=0.05, num_steps=10)
# threshold 2 on the identity statistics below: the null space is everything (AlphaEdit as MEMIT without λC)
ALPHA_HP = AlphaEditHParams(**asdict(MEMIT_HP), nullspace_threshold=2.0)
HPS = {"rome": ROME_HP, "memit": MEMIT_HP, "ft-l": FT_HP, "alphaedit": ALPHA_HP}
# the subject does not end this prompt: the target is predicted two tokens after it
MID = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome",
                  target_true="Paris")


def stats_for(model, name, layers=None):
    eye = torch.eye(model.cfg.d_mlp)
    if name in ("memit", "alphaedit"):
        return {l: eye for l in (layers or MEMIT_HP.layers)}
    return eye if name == "rome" else None


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def refused(model, fn, match, exc=ValueError):
    """`fn()` raises `exc` matching `match`, and the model is bit-identical with no edit applied."""
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        fn()
    after = snapshot(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert edit_stack(model) == []


# ---------------------------------------------------------------- half precision


def _cpu_supports(dtype):
    try:
        torch.ones(4, 4, dtype=dtype) @ torch.ones(4, 4, dtype=dtype)
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["rome", "memit", "ft-l"])
def test_half_precision_edits_apply_and_restore_bit_exact(tiny_model, tmp_path, name, dtype):
    if not _cpu_supports(dtype):
        pytest.skip(f"this CPU cannot multiply {dtype}")
    model = tiny_model.to(dtype)
    assert w_out(model, 1).dtype == dtype
    w0 = snapshot(model)
    outs = [w_out(model, l).detach().clone() for l in range(model.cfg.n_layers)]
    e = METHODS[name].edit(model, REQ, HPS[name], stats=stats_for(model, name), cache_dir=tmp_path)
    assert e.diagnostics["after"]["new_first"][0] > e.diagnostics["before"]["new_first"][0]
    for l in e.layers:
        assert w_out(model, l).dtype == dtype and not torch.equal(w_out(model, l), outs[l])
        assert e.diagnostics["delta_rounding"][l] < 0.1  # the delta survived rounding to half precision
    e.restore()
    assert all(torch.equal(v, w0[k]) for k, v in snapshot(model).items())
    assert edit_stack(model) == []


# ---------------------------------------------------------------- layer arguments


@pytest.mark.parametrize("make, match", [
    (lambda: ROMEHParams(layer=-1), "layer -1 must be >= 0"),
    (lambda: ROMEHParams(layer=True), "layer True must be an int"),
    (lambda: ROMEHParams(layer=1.0), "layer 1.0 must be an int"),
    (lambda: FTHParams(layer=-1), "layer -1 must be >= 0"),
    (lambda: FTHParams(layer=False), "layer False must be an int"),
    (lambda: MEMITHParams(layers=(-1, 0)), r"layers \(-1, 0\) entry -1 must be >= 0"),
    (lambda: MEMITHParams(layers=(0, True)), r"layers \(0, True\) entry True must be an int"),
    (lambda: MEMITHParams(layers=4), "layers 4 must be a sequence"),
    (lambda: MEMITHParams(layers=()), r"layers \(\) is empty"),
    (lambda: MEMITHParams(layers=(0, 2)), r"layers \(0, 2\) must be a contiguous .* \(0, 1, 2\)"),
    (lambda: MEMITHParams(layers=(2, 1)), "contiguous increasing"),
    (lambda: ROMEHParams(layer=1, mom2_n_tokens=0), "mom2_n_tokens 0 must be a positive int"),
])
def test_hparams_refuse_bad_layers(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("name", ["rome", "memit", "ft-l"])
def test_every_method_refuses_a_layer_past_the_model_before_anything_runs(tiny_model, tmp_path, name):
    n = tiny_model.cfg.n_layers
    hp = replace(HPS[name], layers=(n - 1, n)) if name == "memit" else replace(HPS[name], layer=n)
    field = "hparams.layers" if name == "memit" else "hparams.layer"
    stats = stats_for(tiny_model, name, layers=(n - 1, n))
    refused(tiny_model, lambda: METHODS[name].edit_many(tiny_model, [REQ], hp, stats=stats, cache_dir=tmp_path),
            rf"{field}.* {n} is out of range for a {n}-layer model")


def test_layer_stats_layers_are_checked_like_hparams(tiny_model, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("The Eiffel Tower is located in the city of Paris.\n" * 50)
    kw = dict(corpus=str(corpus), n_tokens=200, cache_dir="none", progress=False)
    for layers, match in [(-1, "layers -1 must be >= 0"), (True, "layers True must be an int"),
                          ([0, 3], r"entry 3 is out of range for a 3-layer model"), ("1", "must be a sequence")]:
        with pytest.raises(ValueError, match=match):
            layer_stats(tiny_model, layers, **kw)
    with pytest.raises(ValueError, match=r"layers \[-1\] entry -1 must be >= 0"):
        compute_stats(tiny_model, [-1], corpus=str(corpus), n_tokens=200, progress=False)


# ---------------------------------------------------------------- the last block


@pytest.mark.parametrize("name, hp", [
    ("rome", replace(ROME_HP, layer=2)),
    ("memit", replace(MEMIT_HP, layers=(1, 2))),  # "residual": z is optimised at the last block only
    ("memit", replace(MEMIT_HP, layers=(2,), spread="joint")),
])
def test_last_block_is_refused_when_the_subject_does_not_end_the_prompt(tiny_model, tmp_path, name, hp):
    # measured before the check: ROME and MEMIT "residual" here wrote zero deltas (flat NLL)
    # and reported the edit as applied
    layers = hp.layers if name == "memit" else (hp.layer,)
    stats = stats_for(tiny_model, name, layers=layers)
    refused(tiny_model, lambda: METHODS[name].edit_many(tiny_model, [MID], hp, stats=stats, cache_dir=tmp_path),
            "last block of this 3-layer model.*reaches no later position")


def test_last_block_is_allowed_where_the_edit_can_reach(tiny_model, tmp_path):
    eye = torch.eye(tiny_model.cfg.d_mlp)
    # the subject ends the prompt: ROME's value sits where the target is predicted
    with rome.edit(tiny_model, REQ, replace(ROME_HP, layer=2), stats=eye, cache_dir=tmp_path) as e:
        assert e.diagnostics["after"]["new_first"][0] > 2 * e.diagnostics["before"]["new_first"][0]
    # FT-L trains W_out at the prediction position itself, so the last block edits MID
    with ft.edit(tiny_model, MID, replace(FT_HP, layer=2)) as e:
        assert e.diagnostics["after"]["new_first"][0] > 1.2 * e.diagnostics["before"]["new_first"][0]
    # MEMIT "joint" reaches through its lower layer
    hp = replace(MEMIT_HP, layers=(1, 2), spread="joint")
    with memit.edit(tiny_model, MID, hp, stats={1: eye, 2: eye}, cache_dir=tmp_path) as e:
        curve = e.diagnostics["nll_curves"][0]  # z's loss falls (it stays flat at the last block alone)
        assert curve[-1] < curve[0] and e.diagnostics["delta_ratio"][1] > 0, curve
    assert edit_stack(tiny_model) == []


# ---------------------------------------------------------------- key statistics


@pytest.mark.parametrize("name", ["rome", "memit"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_statistics_are_refused(tiny_model, tmp_path, name, bad):
    stats = stats_for(tiny_model, name)
    C = torch.eye(tiny_model.cfg.d_mlp)
    C[3, 5] = bad
    stats = C if name == "rome" else {**stats, 1: C}
    refused(tiny_model, lambda: METHODS[name].edit(tiny_model, REQ, HPS[name], stats=stats, cache_dir=tmp_path),
            "stats for layer 1 has 1 non-finite")



def _singular(d, kind):
    if kind == "zeros":
        return torch.zeros(d, d)
    if kind == "dead-neuron":  # one key entry never active: a zero row and column
        C = torch.eye(d)
        C[5, 5] = 0.0
        return C
    k = torch.randn(d, 3, generator=torch.Generator().manual_seed(0))
    return k @ k.T / 3  # rank 3: a second moment from 3 tokens


@pytest.mark.parametrize("name", ["rome", "memit"])
@pytest.mark.parametrize("kind", ["zeros", "dead-neuron", "rank-3"])
def test_singular_statistics_are_refused(tiny_model, tmp_path, name, kind):
    # before: ROME raised torch's LinAlgError from inside the solve, or went on with NaN / huge factors
    C = _singular(tiny_model.cfg.d_mlp, kind)
    stats = C if name == "rome" else {**stats_for(tiny_model, name), 1: C}
    refused(tiny_model, lambda: METHODS[name].edit(tiny_model, REQ, HPS[name], stats=stats, cache_dir=tmp_path),
            r"stats for layer 1 is singular \(not positive definite")


def test_rome_refuses_singular_statistics_it_loaded_or_computed(tiny_model, tmp_path, monkeypatch):
    d = tiny_model.cfg.d_mlp
    monkeypatch.setattr(rome, "layer_stats", lambda model, layer, **kw: torch.zeros(d, d))
    refused(tiny_model, lambda: rome.edit(tiny_model, REQ, ROME_HP, cache_dir=tmp_path),
            rf"stats for layer 1 is singular \(not positive definite; {d} of its {d} diagonal entries are <= 0")


@pytest.mark.parametrize("bad, match", [
    (lambda d: {0: torch.eye(d)}, r"stats has no entry for layers \[1\]"),
    (lambda d: [torch.eye(d)], "stats list must be a Tensor or a {layer: Tensor} dict"),
    (lambda d: torch.eye(d).numpy(), "stats ndarray must be a Tensor"),
    (lambda d: torch.eye(d + 1), rf"stats shape \(\d+, \d+\) at layer 1 is not \[d_mlp, d_mlp\]"),
    (lambda d: torch.eye(d, dtype=torch.long), "stats for layer 1 has dtype torch.int64; expected a floating-point"),
])
def test_rome_statistics_of_the_wrong_kind_are_refused(tiny_model, tmp_path, bad, match):
    stats = bad(tiny_model.cfg.d_mlp)
    refused(tiny_model, lambda: rome.edit(tiny_model, REQ, ROME_HP, stats=stats, cache_dir=tmp_path), match)


def test_rome_takes_statistics_as_a_layer_dict(tiny_model, tmp_path):
    # as layer_stats returns them for a list of layers; before, a dict passed the checks and failed on .to()
    eye = torch.eye(tiny_model.cfg.d_mlp)
    a = rome.compute(tiny_model, REQ, ROME_HP, stats=eye, cache_dir=tmp_path)
    b = rome.compute(tiny_model, REQ, ROME_HP, stats={0: 2 * eye, 1: eye}, cache_dir=tmp_path)
    assert torch.equal(a.deltas[1].u, b.deltas[1].u) and torch.equal(a.deltas[1].v, b.deltas[1].v)

def test_non_finite_keys_make_layer_stats_refuse(tiny_model, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("The Eiffel Tower is located in the city of Paris.\n" * 50)
    with torch.no_grad():
        tiny_model.blocks[1].mlp.W_in[0, 0] = float("nan")
    with pytest.raises(ValueError, match="key statistics at layer 1 are not finite"):
        layer_stats(tiny_model, [0, 1], corpus=str(corpus), n_tokens=200, cache_dir=tmp_path, progress=False)
    assert not list(tmp_path.rglob("*.safetensors"))  # nothing cached


@pytest.mark.parametrize("name", ["rome", "memit"])
def test_too_few_statistics_tokens_are_refused_before_computing(tiny_model, tmp_path, name):
    d = tiny_model.cfg.d_mlp
    corpus = tmp_path / "c.txt"
    corpus.write_text("The Eiffel Tower is located in the city of Paris.\n" * 50)
    hp = replace(HPS[name], mom2_n_tokens=d - 1)
    refused(tiny_model, lambda: METHODS[name].edit(tiny_model, REQ, hp, corpus=str(corpus), cache_dir=tmp_path / "cache"),
            f"mom2_n_tokens {d - 1} is below d_mlp {d}.*singular.*pass stats=")
    assert not (tmp_path / "cache").exists()  # refused before any statistics were computed


def test_layer_stats_bounds_the_token_count_asked_for_counted_and_cached(tiny_model, tmp_path, caplog):
    d = tiny_model.cfg.d_mlp
    big, small = tmp_path / "big.txt", tmp_path / "small.txt"
    big.write_text("The Eiffel Tower is located in the city of Paris.\n" * 50)
    small.write_text("The Eiffel Tower is in Paris.\n" * 3)  # fewer than d_mlp tokens
    with pytest.raises(ValueError, match=f"n_tokens {d - 1} is below d_mlp {d}"):
        layer_stats(tiny_model, 1, corpus=str(big), n_tokens=d - 1, cache_dir="none", progress=False)
    C = layer_stats(tiny_model, 1, corpus=str(big), n_tokens=d, cache_dir="none", progress=False)  # the bound
    assert C.shape == (d, d)
    with pytest.raises(ValueError, match=rf"ended after \d+ tokens \(asked for 1000\), below min_tokens {d}"):
        layer_stats(tiny_model, 1, corpus=str(small), n_tokens=1000, cache_dir=tmp_path / "c", progress=False)
    # asked for explicitly, singular statistics can be computed (and are cached) ...
    layer_stats(tiny_model, 1, corpus=str(small), n_tokens=1000, cache_dir=tmp_path / "c", progress=False, min_tokens=0)
    assert list((tmp_path / "c").rglob("*.safetensors"))
    # ... but the cached file is not used where d_mlp tokens are needed
    with caplog.at_level(logging.WARNING, logger="editor.stats"), pytest.raises(ValueError, match="ended after"):
        layer_stats(tiny_model, 1, corpus=str(small), n_tokens=1000, cache_dir=tmp_path / "c", progress=False)
    assert "tokens (<" in caplog.text


# ---------------------------------------------------------------- requests


@pytest.mark.parametrize("name", ["rome", "memit", "ft-l"])
def test_conflicting_requests_are_refused(tiny_model, tmp_path, name):
    other = replace(REQ, target_new="Tokyo", target_true=None)
    filler = EditRequest(prompt=TEMPLATE, subject="Japan", target_new="Tokyo")
    refused(tiny_model, lambda: METHODS[name].edit_many(tiny_model, [REQ, filler, other], HPS[name],
                                                         stats=stats_for(tiny_model, name), cache_dir=tmp_path),
            r"requests 0 and 2 ask for different targets \('Rome' vs 'Tokyo'\) .*both cannot hold")


def test_a_trailing_space_does_not_hide_a_conflict(tiny_model):
    from editor.checks import check_requests

    spaced = replace(REQ, prompt=REQ.prompt + " ", target_new="Tokyo", target_true=None)
    with pytest.raises(ValueError, match="different targets"):
        check_requests(tiny_model, [REQ, spaced])


def test_compatible_requests_are_not_conflicts(tiny_model):
    from editor.checks import check_requests

    longer = replace(REQ, target_new="Rome Paris", target_true=None)  # " Rome" then more: compatible
    check_requests(tiny_model, [REQ, REQ, longer, replace(REQ, subject="Japan", target_new="Tokyo")])


# ---------------------------------------------------------------- the delta itself


@pytest.mark.parametrize("name", ["rome", "memit", "ft-l"])
def test_every_method_reports_the_delta_norm_ratio(tiny_model, tmp_path, name):
    w0 = {l: w_out(tiny_model, l).detach().clone() for l in range(tiny_model.cfg.n_layers)}
    with METHODS[name].edit(tiny_model, REQ, HPS[name], stats=stats_for(tiny_model, name), cache_dir=tmp_path) as e:
        ratios = e.diagnostics["delta_ratio"]
        assert set(ratios) == set(e.layers)
        for l, r in ratios.items():
            want = (w_out(tiny_model, l) - w0[l]).norm() / w0[l].norm()
            assert r == pytest.approx(float(want), rel=1e-4) and r > 0


def test_apply_deltas_refuses_non_finite_and_warns_on_zero_and_large(tiny_model, caplog):
    from editor.result import MAX_DELTA_RATIO

    d, m = tiny_model.cfg.d_mlp, tiny_model.cfg.d_model
    good = LayerDelta(dense=torch.full((d, m), 1e-3))
    nan = torch.zeros(d, m)
    nan[0, 0] = float("nan")
    # layer 0 is fine and would be written first: nothing may be written before the check
    refused(tiny_model, lambda: apply_deltas(tiny_model, {0: good, 2: LayerDelta(dense=nan)}, method="test",
                                             requests=[REQ]), "delta at layer 2 has 1 non-finite")
    refused(tiny_model, lambda: apply_deltas(tiny_model, {0: LayerDelta(dense=torch.ones(d, m + 1))},
                                             method="test", requests=[REQ]), "shape")
    with caplog.at_level(logging.WARNING, logger="editor.result"):
        e = apply_deltas(tiny_model, {1: LayerDelta(dense=torch.zeros(d, m))}, method="test", requests=[REQ])
    assert "delta at layer 1 is zero" in caplog.text and e.diagnostics["delta_ratio"] == {1: 0.0}
    e.restore()
    caplog.clear()
    big = w_out(tiny_model, 1).detach().float() * (2 * MAX_DELTA_RATIO)
    with caplog.at_level(logging.WARNING, logger="editor.result"):
        e = apply_deltas(tiny_model, {1: LayerDelta(dense=big)}, method="test", requests=[REQ])
    assert e.diagnostics["delta_ratio"][1] == pytest.approx(2 * MAX_DELTA_RATIO, rel=1e-5)
    assert "above" in caplog.text and "layer 1" in caplog.text
    e.restore()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="editor.result"):
        e = apply_deltas(tiny_model, {1: LayerDelta(dense=big * 0.01)}, method="test", requests=[REQ])
    assert caplog.text == ""  # a small delta passes quietly
    e.restore()



@pytest.mark.parametrize("second", ["shape", "not-a-delta", "past-the-model", "negative", "overflow"])
def test_apply_deltas_checks_every_layer_before_writing_any(tiny_model, second):
    d, m, n = tiny_model.cfg.d_mlp, tiny_model.cfg.d_model, tiny_model.cfg.n_layers
    good = LayerDelta(dense=torch.full((d, m), 1e-3))
    if second == "overflow":  # finite, but W + delta is inf in float16 (max 65504): it was written as inf
        tiny_model.to(torch.float16)
    layer, delta, match = {
        "shape": (1, LayerDelta(dense=torch.ones(d, m + 1)), r"delta shape \(\d+, \d+\) at layer 1 is not W_out's"),
        "not-a-delta": (1, torch.ones(d, m), r"deltas\[1\] is a Tensor, expected a LayerDelta"),  # was AttributeError
        "past-the-model": (n, good, f"deltas layer {n} is out of range for a {n}-layer model"),  # was IndexError
        "negative": (-1, good, "deltas layer -1 must be >= 0"),  # silently edited the last block
        "overflow": (1, LayerDelta(dense=torch.full((d, m), 1e5)), f"at layer 1 has {d * m} entries that are not finite in float16"),
    }[second]
    # layer 0 is fine and comes first: nothing may be written before the bad layer is seen
    refused(tiny_model, lambda: apply_deltas(tiny_model, {0: good, layer: delta}, method="test", requests=[REQ]), match)


def test_apply_deltas_undoes_its_writes_when_a_later_write_fails(tiny_model, monkeypatch):
    import editor.result

    d, m = tiny_model.cfg.d_mlp, tiny_model.cfg.d_model
    real, calls = editor.result._delta_on, []

    def fail_at_the_second_write(delta, w):
        calls.append(1)
        if len(calls) == 4:  # two checks, the first write, then the second write
            raise RuntimeError("out of memory")
        return real(delta, w)

    monkeypatch.setattr(editor.result, "_delta_on", fail_at_the_second_write)
    deltas = {0: LayerDelta(dense=torch.full((d, m), 1e-3)), 2: LayerDelta(dense=torch.full((d, m), 1e-3))}
    refused(tiny_model, lambda: apply_deltas(tiny_model, deltas, method="test", requests=[REQ]), "out of memory", RuntimeError)


def _poisoned(edit, bad):
    """`edit` with one entry of its first layer's delta set to `bad`."""
    l = edit.layers[0]
    d = edit.deltas[l]
    if d.dense is not None:
        dense = d.dense.clone()
        dense[0, 0] = bad
        return replace(edit, deltas={**edit.deltas, l: LayerDelta(dense=dense)})
    u = d.u.clone()
    u[0, 0] = bad
    return replace(edit, deltas={**edit.deltas, l: LayerDelta(u=u, v=d.v)})


@pytest.mark.parametrize("name", ["rome", "memit", "ft-l", "alphaedit"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_no_method_writes_a_non_finite_delta(tiny_model, tmp_path, monkeypatch, name, bad):
    module = {"rome": rome, "memit": memit, "ft-l": ft, "alphaedit": alphaedit}[name]
    real = module.compute
    monkeypatch.setattr(module, "compute", lambda *a, **k: _poisoned(real(*a, **k), bad))
    edit = module.compute(tiny_model, REQ, HPS[name], stats=stats_for(tiny_model, name), cache_dir=tmp_path)
    match = rf"delta at layer {edit.layers[0]} has \d+ non-finite entries \(NaN or inf\); no weight was changed"
    for fn in (lambda: module.edit_many(tiny_model, [REQ], HPS[name], stats=stats_for(tiny_model, name), cache_dir=tmp_path),
               lambda: edit.apply(tiny_model), lambda: edit.applied(tiny_model).__enter__(),
               lambda: apply_saved(tiny_model, edit.save(tmp_path / "bad.safetensors"))):
        refused(tiny_model, fn, match)


def test_rome_refuses_non_finite_factors_before_writing_them_for_the_next_request(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(rome, "right_vector", lambda key, **vecs: torch.full_like(vecs["delta"], float("nan")))
    filler = EditRequest(prompt=TEMPLATE, subject="Japan", target_new="Tokyo")
    refused(tiny_model, lambda: rome.edit_many(tiny_model, [REQ, filler], ROME_HP, stats=stats_for(tiny_model, "rome"),
                                               cache_dir=tmp_path),
            r"ROME factors for request 0 \('The capital city of France' -> 'Rome'\) are not finite")

# ---------------------------------------------------------------- keyword arguments


def test_methods_share_one_keyword_set_and_refuse_misspelled_ones(tiny_model, tmp_path):
    sigs = {name: list(inspect.signature(m.edit_many).parameters) for name, m in METHODS.items()}
    assert sigs["rome"] == sigs["memit"] == sigs["ft-l"] == sigs["alphaedit"]
    for name, m in METHODS.items():
        for fn, reqs in ((m.edit_many, [REQ]), (m.edit, REQ)):
            refused(tiny_model, lambda: fn(tiny_model, reqs, HPS[name], cache_dirr=tmp_path), "cache_dirr", TypeError)
    # FT-L takes the keywords the other methods need, and does not use them
    with ft.edit_many(tiny_model, [REQ], FT_HP, stats=torch.eye(2), corpus="/no/such/file", cache_dir=tmp_path) as e:
        assert e.method == "ft-l"
