"""AlphaEdit (Fang et al. 2025) on the tiny model and in closed form: the update lies in the
null space of the preserved keys, later batches keep earlier batches' keys, the solve is the
paper's Eq. 14, bad input is refused before anything runs, and a sequential run resumes."""

from dataclasses import replace

import pytest
import torch

from benchmarks.counterfact import evaluate_counterfact
from benchmarks.data import load_counterfact
from benchmarks.sequential import run_sequential
from editor import METHODS, AlphaEditHParams, AlphaEditSequence, Edit, EditRequest, alphaedit
from editor.alphaedit import alphaedit_solve, energy_threshold, null_space_projector
from editor.common import probe
from editor.optimize import subject_keys
from tests.conftest import FIXTURES
from tracer import weights_hash
from tracer.model import w_out

from .test_edit import REQ, TEMPLATE

HP = AlphaEditHParams(layers=(0, 1), v_lr=1.0, v_num_grad_steps=15, clamp_norm_factor=50.0, v_weight_decay=0.0,
                      kl_factor=0.0, context_lengths=((4, 2),), nullspace_threshold=1e-2, alpha=1e-3)
SECOND = [EditRequest(prompt=TEMPLATE, subject="Japan", target_new="Tokyo", target_true="Berlin"),
          EditRequest(prompt="{} is located in the city of", subject="The Louvre", target_new="Rome", target_true="Paris")]


def designed_stats(d: int, seed: int = 0):
    """`C = Q diag(λ) Qᵀ` with half its eigenvalues 1e-3 (the null space at threshold 1e-2) and half 1."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    lam = torch.cat([torch.full((d // 2,), 1e-3), torch.ones(d - d // 2)]).double()
    return (Q * lam) @ Q.T, Q[:, d // 2 :]  # C, a basis of the preserved (large-eigenvalue) subspace


def stats_for(model):
    C, kept = designed_stats(model.cfg.d_mlp)
    return {l: C.float() for l in HP.layers}, kept


def test_projector_spans_the_small_eigenvalues_and_refuses_rank_zero():
    C, kept = designed_stats(16)
    P, rank = null_space_projector(C, 1e-2)
    assert rank == 8 and torch.allclose(P @ P, P, atol=1e-10) and torch.allclose(P @ kept, torch.zeros_like(kept), atol=1e-10)
    with pytest.raises(ValueError, match="rank 0"):
        null_space_projector(C, 1e-4)


def test_an_energy_share_picks_the_largest_null_space_within_it():
    gen = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(10, 10, generator=gen, dtype=torch.float64))
    lam = torch.tensor([1, 2, 3, 4, 10, 20, 40, 80, 160, 680], dtype=torch.float64) / 1000  # tr(C) = 1
    C = (Q * lam) @ Q.T
    for share, rank in [(0.0061, 3), (0.0101, 4), (0.0201, 5), (0.0009, 0)]:
        if rank == 0:
            with pytest.raises(ValueError, match="nullspace_energy .* rank 0"):
                energy_threshold(C, share)
            continue
        P, r = null_space_projector(C, energy=share)
        assert r == rank and float((P * C).sum() / C.trace()) <= share  # within the share, and
        assert null_space_projector(C, energy_threshold(C, share))[1] == rank  # the threshold recorded for it
        assert float(lam[: rank + 1].sum()) > share                       # one more direction would not be
    # on a spread-out spectrum (keys of very different scales), every share gives exactly the rank it implies
    X = torch.randn(300, 200, generator=gen) * torch.logspace(-2, 1, 200)
    W = (X.T @ X / 300).float()
    lam = torch.linalg.eigvalsh(W.double())
    for share in [0.002 * i for i in range(1, 30)]:
        P, r = null_space_projector(W, energy=share)
        assert r == int((torch.cumsum(lam, 0) <= share * lam.sum()).sum()), share
        assert float((P * W.double()).sum() / W.double().trace()) <= share + 1e-12, share
    # tied eigenvalues at the boundary: the share still decides the rank, and a rank 0 names the share
    ties = torch.diag(torch.tensor([1, 2, 2, 3, 92], dtype=torch.float64) / 100)
    assert null_space_projector(ties, energy=0.035)[1] == 2
    assert null_space_projector(torch.eye(10, dtype=torch.float64), energy=0.35)[1] == 3
    with pytest.raises(ValueError, match="nullspace_energy 0.005 .* rank 0"):
        null_space_projector(ties, energy=0.005)
    with pytest.raises(ValueError, match="not both"):
        null_space_projector(ties, 0.1, energy=0.1)
    # the solve builds P by the share, layer by layer, and records it
    info = {}
    seq = AlphaEditSequence()
    for scale, layer in ((1.0, 0), (10.0, 1)):
        alphaedit_solve(replace(HP, nullspace_energy=0.0201), {0: C, 1: scale * C}, seq, info)(layer, torch.randn(10, 2, dtype=torch.float64, generator=gen))
    for layer, scale in ((0, 1.0), (1, 10.0)):
        assert info[layer]["rank"] == 5 and info[layer]["nullspace_energy"] == 0.0201
        assert info[layer]["unprotected_energy"] <= 0.0201 and info[layer]["threshold"] == pytest.approx(0.015 * scale)
    # per layer: the same share means a different threshold where the key scale differs
    hp = replace(HP, nullspace_energy=0.0201)
    assert hp.threshold(C) == pytest.approx(0.015) and hp.threshold(10 * C) == pytest.approx(0.15)  # midway to the next
    assert HP.threshold(10 * C) == HP.nullspace_threshold
    for bad in (0.0, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="nullspace_energy"):
            replace(HP, nullspace_energy=bad)


def test_keys_in_the_preserved_subspace_map_as_before(tiny_model, tmp_path):
    stats, kept = stats_for(tiny_model)
    e = alphaedit.compute(tiny_model, [REQ] + SECOND, HP, stats=stats, cache_dir=tmp_path)
    half = tiny_model.cfg.d_mlp // 2
    assert {int(l): i["rank"] for l, i in e.diagnostics["nullspace"].items()} == {0: half, 1: half}
    # half the eigenvalues 1e-3, half 1: the edit space holds 1e-3 / (1e-3 + 1) of tr(C)
    for i in e.diagnostics["nullspace"].values():
        assert i["unprotected_energy"] == pytest.approx(1e-3 / 1.001, rel=1e-4)
    for layer, d in e.deltas.items():
        dw = d.matrix().double()  # [d_mlp, d_model]
        assert dw.norm() > 1e-3
        # a preserved key k = kept @ x: its output k ΔW_out is (numerically) zero
        assert (kept.T @ dw).norm() < 1e-6 * dw.norm(), layer
    before = e.diagnostics["before"]["new_first"]
    with e.applied(tiny_model):
        now = probe(tiny_model, [REQ] + SECOND)["new_first"]
    # and the edits still take (on the tiny random models, more weakly for some requests)
    assert now[0] > 1.5 * before[0] and now.mean() > 1.3 * before.mean(), (before, now)


def test_solve_is_the_papers_equation_14():
    gen = torch.Generator().manual_seed(1)
    d_in, d_out, n, n_prior = 12, 5, 3, 4
    C, _ = designed_stats(d_in, seed=2)
    K = torch.randn(d_in, n, generator=gen, dtype=torch.float64)
    R = torch.randn(d_out, n, generator=gen, dtype=torch.float64)  # the paper's [d_out, n]
    Kp = torch.randn(d_in, n_prior, generator=gen, dtype=torch.float64)
    seq = AlphaEditSequence()
    seq.kkt[0] = Kp @ Kp.T
    hp = replace(HP, layers=(0,), alpha=0.7)
    A = alphaedit_solve(hp, {0: C}, seq, {})(0, K)  # ΔW_out = A Rᵀ
    P, _ = null_space_projector(C, hp.nullspace_threshold)
    paper = R @ K.T @ P @ torch.linalg.inv(Kp @ Kp.T @ P + K @ K.T @ P + 0.7 * torch.eye(d_in, dtype=torch.float64))
    assert torch.allclose((A @ R.T).T, paper @ P, atol=1e-9)  # the update written is ΔP (paper, section 3)
    assert torch.allclose((A @ R.T).T, paper, atol=1e-9)      # and ΔP = Δ: Δ already lies in range(P)


def test_the_soft_preservation_term_is_a_stationary_point_and_protects_general_keys():
    gen = torch.Generator().manual_seed(4)
    d_in, d_out, n = 12, 5, 3
    C, _ = designed_stats(d_in, seed=5)
    C = C + 0.004 * torch.eye(d_in, dtype=torch.float64)  # a null space that still holds some energy
    K = torch.randn(d_in, n, generator=gen, dtype=torch.float64)
    R = torch.randn(d_out, n, generator=gen, dtype=torch.float64)
    Kp = torch.randn(d_in, 2, generator=gen, dtype=torch.float64)
    seq = AlphaEditSequence()
    seq.kkt[0] = Kp @ Kp.T
    P, _ = null_space_projector(C, 1e-2)
    moved = {}
    for lam in (0.0, 500.0):
        hp = replace(HP, layers=(0,), alpha=0.7, preserve_weight=lam)
        D = (alphaedit_solve(hp, {0: C}, seq, {})(0, K) @ R.T).T  # the paper's ΔP, [d_out, d_in]
        assert torch.allclose(D @ P, D, atol=1e-9)
        # the gradient of ‖D K − R‖² + ‖D K_p‖² + λ₀ tr(D C Dᵀ) + α ‖D‖² over D = ΔP vanishes in range(P)
        grad = (D @ K - R) @ K.T + D @ Kp @ Kp.T + lam * D @ C + 0.7 * D
        assert (grad @ P).norm() < 1e-8 * R.norm()
        moved[lam] = float(torch.trace(D @ C @ D.T))  # mean squared change of a preserved key's output
    assert moved[500.0] < 0.5 * moved[0.0]
    with pytest.raises(ValueError, match="preserve_weight"):
        replace(HP, preserve_weight=-1.0)


def test_a_second_batch_keeps_the_first_batchs_keys(tiny_model, tmp_path):
    stats, _ = stats_for(tiny_model)
    seq = AlphaEditSequence()
    first = alphaedit.compute(tiny_model, [REQ], HP, stats=stats, cache_dir=tmp_path, sequence=seq)
    with first.applied(tiny_model):
        seq.record(tiny_model, first)
        assert seq.n_keys == 1 and set(seq.kkt) == {0, 1}
        keys = {l: subject_keys(tiny_model, [REQ], first.diagnostics["templates"], l).mean(1).double() for l in HP.layers}
        with_seq = alphaedit.compute(tiny_model, SECOND, HP, stats=stats, cache_dir=tmp_path, sequence=seq)
        without = alphaedit.compute(tiny_model, SECOND, HP, stats=stats, cache_dir=tmp_path)
    for l in HP.layers:  # how far the second batch moves the first batch's key's output
        moved = float((keys[l] @ with_seq.deltas[l].matrix().double()).norm())
        free = float((keys[l] @ without.deltas[l].matrix().double()).norm())
        assert moved < 0.2 * free, (l, moved, free)


def test_bad_input_is_refused_before_the_optimisation(tiny_model, tmp_path, monkeypatch):
    stats, _ = stats_for(tiny_model)
    monkeypatch.setattr(alphaedit, "compute_zs", lambda *a, **k: pytest.fail("optimised before refusing"))
    before = weights_hash(tiny_model)
    with pytest.raises(ValueError, match="contiguous"):
        replace(HP, layers=(0, 2))
    with pytest.raises(ValueError, match="hparams.layers"):
        alphaedit.compute(tiny_model, [REQ], replace(HP, layers=(2, 3)), stats={2: stats[0], 3: stats[0]}, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="rank 0"):
        alphaedit.compute(tiny_model, [REQ], replace(HP, nullspace_threshold=1e-5), stats=stats, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="nullspace_energy .* rank 0"):
        alphaedit.compute(tiny_model, [REQ], replace(HP, nullspace_energy=1e-6), stats=stats, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="nullspace_threshold"):
        replace(HP, nullspace_threshold=0.0)
    with pytest.raises(ValueError, match="AlphaEditSequence"):
        alphaedit.compute(tiny_model, [REQ], HP, stats=stats, cache_dir=tmp_path, sequence={})
    assert weights_hash(tiny_model) == before


def test_saved_alphaedit_loads_with_its_hparams(tiny_model, tmp_path):
    stats, _ = stats_for(tiny_model)
    e = alphaedit.compute(tiny_model, [REQ], HP, stats=stats, cache_dir=tmp_path)
    back = Edit.load(e.save(tmp_path / "a.safetensors"))
    assert back.hparams == HP and back.method == "alphaedit"


def test_sequential_alphaedit_resumes_with_the_same_sequence(tiny_model, tmp_path):
    stats, _ = stats_for(tiny_model)
    records = load_counterfact(FIXTURES / "counterfact_tiny.json")
    common = dict(records=records, evaluate=lambda m, r: evaluate_counterfact(m, r, gen_tokens=0), batch=1, hparams=HP,
                  edit_kwargs={"stats": stats, "cache_dir": tmp_path / "c"})
    before = weights_hash(tiny_model)
    full = run_sequential(model=tiny_model, method=METHODS["alphaedit"], out_dir=tmp_path / "full", **common)

    class Dies:  # AlphaEdit that is killed at its third batch
        def __init__(self):
            self.n = 0

        def __getattr__(self, name):
            return getattr(METHODS["alphaedit"], name)

        def compute(self, *a, **k):
            self.n += 1
            if self.n == 3:
                raise RuntimeError("killed")
            return METHODS["alphaedit"].compute(*a, **k)

    with pytest.raises(RuntimeError, match="killed"):
        run_sequential(model=tiny_model, method=Dies(), out_dir=tmp_path / "r", **common)
    resumed = run_sequential(model=tiny_model, method=METHODS["alphaedit"], out_dir=tmp_path / "r", **common)
    assert resumed["model_restored"] and weights_hash(tiny_model) == before
    third = [Edit.load(tmp_path / d / "edits" / "batch_00002.safetensors") for d in ("full", "r")]
    # the resumed run's third batch was solved against the replayed K_p K_pᵀ: the same deltas
    assert all(torch.equal(third[0].deltas[l].u, third[1].deltas[l].u) and torch.equal(third[0].deltas[l].v, third[1].deltas[l].v)
               for l in HP.layers)
    assert full["checkpoints"][-1]["metrics"] == pytest.approx(resumed["checkpoints"][-1]["metrics"])


def test_sequence_misuse_is_refused_or_warned(tiny_model, tmp_path, caplog):
    stats, _ = stats_for(tiny_model)
    seq = AlphaEditSequence()
    e = alphaedit.compute(tiny_model, [REQ], HP, stats=stats, cache_dir=tmp_path, sequence=seq)
    with pytest.raises(ValueError, match="not applied to this model"):
        seq.record(tiny_model, e)
    with e.applied(tiny_model):
        seq.record(tiny_model, e)
        with pytest.raises(ValueError, match="already in the sequence"):
            seq.record(tiny_model, e)
        with caplog.at_level("WARNING", logger="editor.alphaedit"):
            alphaedit.compute(tiny_model, SECOND, HP, stats=stats, cache_dir=tmp_path)  # a fresh sequence
        assert "not in this sequence" in caplog.text
    other = AlphaEditSequence()
    other.kkt[0] = torch.eye(7, dtype=torch.float64)
    with pytest.raises(ValueError, match="another model's sequence"):
        alphaedit.compute(tiny_model, [REQ], HP, stats=stats, cache_dir=tmp_path, sequence=other)
    # new statistics give a new projector, not the cached one
    C2, _ = designed_stats(tiny_model.cfg.d_mlp, seed=5)
    assert not torch.equal(seq.projector(0, stats[0], 1e-2)[0], seq.projector(0, C2.float(), 1e-2)[0])
