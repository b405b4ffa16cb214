"""ROME's key choices (`ROMEHParams.key`), KL position and early-stop criterion, in closed form.

Each key choice states which key the rank-one update maps to which value; after the edit
that mapping must hold exactly (up to float32 rounding), on a non-identity `C`.
"""

from dataclasses import replace

import pytest
import torch

from editor import EditRequest, ROMEHParams, rome
from editor.optimize import optimize_values, subject_keys
from tracer.model import w_out

REQ = EditRequest(prompt="The capital city of {}", subject="France", target_new="Rome", target_true="Paris")
REQ2 = EditRequest(prompt="{} plays the sport of", subject="Michael Jordan", target_new="tennis")
HP = ROMEHParams(layer=1, v_lr=1.0, v_num_grad_steps=6, clamp_norm_factor=50.0, v_weight_decay=0.0,
                 kl_factor=0.0, context_lengths=((4, 2),))
TEMPLATES = ["{}", "The first time. {}", "I think that. {}"]


def _spd(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g)
    return a @ a.T / d + 0.1 * torch.eye(d)


@pytest.mark.parametrize("key", ["original", "r-rome", "mean-key-shift"])
def test_each_key_maps_its_key_to_its_value(tiny_model, key):
    """original: k0 -> k0 W + δ; r-rome: k* -> k0 W + δ; mean-key-shift: k* -> k* W + δ."""
    hp = replace(HP, key=key)
    C = _spd(tiny_model.cfg.d_mlp)
    f = rome.compute_factors(tiny_model, [REQ], hp, C=C, templates=TEMPLATES, keys=[key])[0]
    K = subject_keys(tiny_model, [REQ], TEMPLATES, hp.layer)[0]
    k_star, k0 = K.mean(0), K[0]
    w = w_out(tiny_model, hp.layer).detach().float().clone()
    delta = f["info"]["delta_norm"]
    assert delta > 0
    w_new = w + torch.outer(f["u"], f["v"][key])
    # recover δ from the 'original' form, which every key shares: δ = (k0 W' - k0 W) under original
    if key == "original":
        src, want_base = k0, k0 @ w
    elif key == "r-rome":
        src, want_base = k_star, k0 @ w
    else:
        src, want_base = k_star, k_star @ w
    got = src @ w_new - want_base  # must be δ, the same for every key
    assert torch.allclose(got.norm(), torch.tensor(delta), rtol=1e-4)
    # and the same δ vector whichever key is chosen (all keys share the optimisation)
    f_orig = rome.compute_factors(tiny_model, [REQ], hp, C=C, templates=TEMPLATES, keys=["original"])[0]
    delta_vec = (k0 @ (w + torch.outer(f_orig["u"], f_orig["v"]["original"]))) - k0 @ w
    assert torch.allclose(got, delta_vec, atol=1e-4 * delta_vec.norm())


def test_keys_differ_where_the_bare_and_mean_keys_differ(tiny_model):
    C = _spd(tiny_model.cfg.d_mlp)
    f = rome.compute_factors(tiny_model, [REQ], HP, C=C, templates=TEMPLATES,
                             keys=["original", "r-rome", "mean-key-shift"])[0]
    v = f["v"]
    assert not torch.allclose(v["r-rome"], v["mean-key-shift"])
    assert not torch.allclose(v["r-rome"], v["original"])


def test_key_orthogonal_in_c_metric_maps_as_before(tiny_model):
    """ROME with a non-identity C: a key k with kᵀC⁻¹k* = 0 is untouched by the update."""
    C = _spd(tiny_model.cfg.d_mlp, seed=3)
    f = rome.compute_factors(tiny_model, [REQ], HP, C=C, templates=TEMPLATES)[0]
    u = f["u"]  # ∝ C⁻¹ k*
    g = torch.Generator().manual_seed(1)
    k = torch.randn(tiny_model.cfg.d_mlp, generator=g)
    k = k - (k @ u) / (u @ u) * u  # k·u = 0  <=>  kᵀ C⁻¹ k* = 0
    w = w_out(tiny_model, HP.layer).detach().float()
    assert torch.allclose(k @ (w + torch.outer(u, f["v"][HP.key])), k @ w, atol=1e-5)


def test_batched_factors_equal_alone(tiny_model):
    C = _spd(tiny_model.cfg.d_mlp)
    both = rome.compute_factors(tiny_model, [REQ, REQ2], HP, C=C, templates=TEMPLATES)
    for req, f in zip([REQ, REQ2], both):
        alone = rome.compute_factors(tiny_model, [req], HP, C=C, templates=TEMPLATES)[0]
        assert torch.allclose(f["u"], alone["u"], atol=1e-6)
        assert torch.allclose(f["v"][HP.key], alone["v"][HP.key], rtol=1e-3, atol=1e-4)
        assert f["info"]["nll_curve"] == pytest.approx(alone["info"]["nll_curve"], rel=1e-3, abs=1e-4)


def _opt(model, **kw):
    base = dict(layer=1, templates=TEMPLATES, kl_prompts=["{} is a"], ref_norm=torch.ones(1), steps=8, lr=1.0,
                weight_decay=0.0, clamp_norm_factor=50.0, kl_factor=1.0, early_stop_nll=-1.0)
    return optimize_values(model, [REQ], **{**base, **kw})


def test_kl_position_changes_the_loss(tiny_model):
    d_last, _ = _opt(tiny_model, kl_position="last")
    d_subj, _ = _opt(tiny_model, kl_position="subject")
    assert not torch.allclose(d_last, d_subj)


def test_early_stop_on_loss_counts_the_kl_and_decay(tiny_model):
    # δ = 0 at step 0, so the KL and the weight decay are 0 there; from step 1 on the weight
    # decay is large. A threshold just above step 1's NLL stops "nll" there, never "loss".
    _, curve = _opt(tiny_model, steps=3, weight_decay=100.0)
    nll0, nll1 = curve[0][0], curve[1][0]
    assert nll1 < nll0
    thr = (nll0 + nll1) / 2
    _, on_nll = _opt(tiny_model, steps=3, early_stop_nll=thr, early_stop_on="nll", weight_decay=100.0)
    _, on_loss = _opt(tiny_model, steps=3, early_stop_nll=thr, early_stop_on="loss", weight_decay=100.0)
    assert len(on_nll) == 2  # stopped at step 1
    assert len(on_loss) == 3  # ran every step


@pytest.mark.parametrize("field,value", [("key", "rrome"), ("kl_position", "first"), ("early_stop_on", "kl")])
def test_bad_options_raise(field, value):
    with pytest.raises(ValueError, match=field):
        ROMEHParams(layer=1, **{field: value})
