"""AlphaEdit: MEMIT with its update projected onto the null space of the preserved keys
(Fang et al., ICLR 2025, "AlphaEdit: Null-Space Constrained Knowledge Editing for Language Models").

MEMIT trades the new facts against the keys it should preserve through the term `λC` of
its normal equations, so every update still disturbs preserved knowledge a little, and
under sequential editing the disturbances pile up until the model collapses. AlphaEdit
removes the trade: it projects the update onto the null space of the preserved keys, where
it cannot change their outputs, and keeps earlier edits' keys in the solve instead.

Per edited layer, in the paper's orientation (`W: [d_out, d_in]`, keys `K: [d_in, n]`,
residuals `R: [d_out, n]`):

- `P = Û Ûᵀ`, where `Û` are the eigenvectors of the preserved keys' second moment
  `K₀K₀ᵀ` (here `C = E[k kᵀ]` over text, `editor.stats`) whose eigenvalues fall below
  `nullspace_threshold` (the paper's section 3.2; the threshold and the rank of `P` are
  recorded in the edit's diagnostics). Or, with `nullspace_energy` (ours), a threshold per
  layer: the largest null space whose eigenvalues sum to at most that share of `tr(C)`. Then `K₀ᵀ P ≈ 0`: the update `ΔP` cannot move the
  preserved keys' outputs.
- `Δ = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + α I)⁻¹` (the paper's Eq. 14), with `K_p` the keys of
  every earlier batch of the sequence, accumulated as a running `K_p K_pᵀ` (an
  `AlphaEditSequence`, passed along by the caller, never hidden global state); the update
  written is `ΔP`. MEMIT's preservation term `λC` is dropped: `P` protects those keys.
- Where `P` is not an exact null space (its directions still carry some of `tr(C)`), an
  optional soft term (ours, `preserve_weight` `λ₀`, default 0, the paper's update) adds
  `λ₀ E‖ΔP k₀‖²` over preserved keys `k₀` (`λ₀ C` in the normal equations) to the objective:
  `Δ = R Kᵀ P ((K_p K_pᵀ + K Kᵀ + λ₀ C) P + α I)⁻¹`, MEMIT's preservation acting only
  inside the edit space.

In our `[d_mlp, d_model]` orientation (`W_out` is the transpose), with `P` symmetric, the
written update is `ΔW_out = (P G + α I)⁻¹ P K Rᵀ` with `G = K_p K_pᵀ + K Kᵀ (+ λ₀ C)`, kept
factored as `LayerDelta(u=A, v=Rᵀ)` with `A = (P G + α I)⁻¹ P K` (`[d_mlp, n]`). With
`λ₀ = 0` this is the same solve as the authors' code. Its columns lie in the range of `P`
exactly (`α A = P (K − G A)`), so keys with `kᵀP = 0` map as before.

Everything else is MEMIT's (`editor.memit`): the target residuals `z`, the layer spread
(including our joint spread for post-norm models) and the keys averaged over context
templates (the authors' code keeps one key per template; the average is MEMIT's and ours).

Example:
    >>> from editor import alphaedit
    >>> seq = alphaedit.AlphaEditSequence()
    >>> for batch in batches:
    ...     e = alphaedit.compute(model, batch, sequence=seq)
    ...     e.apply(model)
    ...     seq.record(model, e)               # its keys join K_p K_pᵀ
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import Tensor

from editor.common import conveniences, edit_hashes, probe, start_compute, templates_for
from editor.checks import check_real
from editor.edit import Edit
from editor.hparams import MEMITHParams, memit_hparams
from editor.memit import compute_zs, spread_updates
from editor.optimize import subject_keys
from editor.result import edit_stack
from editor.stats import layer_stats
from tracer.model import model_name

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, repr=False)
class AlphaEditHParams(MEMITHParams):
    """AlphaEdit: MEMIT's fields (see `MEMITHParams`; `mom2_update_weight` is unused, as the
    null-space projection replaces MEMIT's preservation term), plus:

    Attributes:
        nullspace_threshold: eigenvalues of `C = E[k kᵀ]` below this span the null space
            `P` projects onto (the authors' default 2e-2). Its rank depends on the model's key
            scale: on Gemma-3-270m layer 4 (100k WikiText-2 tokens), 2e-2 keeps 1593 of 2048
            directions, 1e-2 keeps 1199.
        nullspace_energy: None (the default) uses `nullspace_threshold`. A share in (0, 1)
            replaces it, layer by layer, with the threshold `energy_threshold(C, share)`: the
            largest null space whose eigenvalues sum to at most `share · tr(C)`, so that
            `tr(P C) / tr(C) ≤ share` at every layer. Ours, not the paper's: one absolute
            threshold means different things at layers whose key scales differ (on
            Gemma-3-270m `tr(C)` runs from 28 to 238 over layers 2–6, and 2e-2 leaves 4.5% to
            28.8% of it unprotected).
        alpha: `α` of `((K_p K_pᵀ + K Kᵀ + λ₀ C) P + α I)⁻¹` (the authors' `L2`, 10).
        preserve_weight: `λ₀` of the soft preservation term inside the edit space (module
            docstring; ours). 0, the default, is the paper's update; in the units of
            MEMIT's `mom2_update_weight` (`C = E[k kᵀ]` per preserved key).

    Raises:
        ValueError: as `MEMITHParams`, or a non-positive or non-finite `nullspace_threshold`
            or `alpha`, a `nullspace_energy` outside (0, 1), or a negative `preserve_weight`.
    """

    nullspace_threshold: float = 2e-2
    nullspace_energy: float | None = None
    alpha: float = 10.0
    preserve_weight: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "nullspace_threshold", check_real(self.nullspace_threshold, "nullspace_threshold", positive=True))
        object.__setattr__(self, "alpha", check_real(self.alpha, "alpha", positive=True))
        object.__setattr__(self, "preserve_weight", check_real(self.preserve_weight, "preserve_weight", minimum=0.0))
        if self.nullspace_energy is not None:
            share = check_real(self.nullspace_energy, "nullspace_energy", positive=True)
            if share >= 1:
                raise ValueError(f"nullspace_energy {share} must be a share of tr(C) below 1 (e.g. 0.02)")
            object.__setattr__(self, "nullspace_energy", share)

    def threshold(self, C: Tensor) -> float:
        """The eigenvalue threshold for a layer whose key second moment is `C`:
        `nullspace_threshold`, or `energy_threshold(C, nullspace_energy)` when that is set.

        Raises:
            ValueError: from `energy_threshold` (a share below the smallest eigenvalue's).
        """
        return self.nullspace_threshold if self.nullspace_energy is None else energy_threshold(C, self.nullspace_energy)


def alphaedit_hparams(model_or_name, *, layer: int | None = None, cache_dir=None) -> AlphaEditHParams:
    """The model's MEMIT preset (`memit_hparams`, same arguments) with AlphaEdit's defaults.

    Raises:
        ValueError: what `memit_hparams` raises.
    """
    return AlphaEditHParams(**asdict(memit_hparams(model_or_name, layer=layer, cache_dir=cache_dir)))


def null_space_projector(C: Tensor, threshold: float | None = None, *, energy: float | None = None) -> tuple[Tensor, int]:
    """`(P, rank)`: the projector onto the eigenvectors of `C` with eigenvalues below `threshold`,
    or, given `energy` instead, onto the most eigenvectors (smallest eigenvalues first) whose
    eigenvalues sum to at most `energy · tr(C)`.

    Args:
        C: the keys' second moment `E[k kᵀ]`, `[d_mlp, d_mlp]`, symmetric.
        threshold: eigenvalue bound (in `C`'s units, squared key activations).
        energy: a share of `tr(C)` in (0, 1) (`nullspace_energy`), chosen on the same
            eigendecomposition that gives `P`, so `tr(P C) / tr(C) ≤ energy` also where
            eigenvalues tie.

    Returns:
        `P = Û Ûᵀ` (`[d_mlp, d_mlp]`, float64) and its rank (AlphaEdit section 3.2).

    Raises:
        ValueError: not exactly one of `threshold` and `energy`; a null space of rank 0
            (nothing could be edited), naming the field that caused it.
    """
    if (threshold is None) == (energy is None):
        raise ValueError("give null_space_projector a threshold or an energy share, not both or neither")
    evals, evecs = torch.linalg.eigh(C.double())
    if energy is None:
        keep = evals < threshold
        rank = int(keep.sum())
        if rank == 0:
            raise ValueError(
                f"nullspace_threshold {threshold} leaves a null space of rank 0 (the smallest eigenvalue of C is "
                f"{float(evals.min()):.3g}): no update could be made; raise the threshold"
            )
    else:
        rank = _energy_rank(evals, energy)
        keep = torch.arange(len(evals)) < rank  # eigh sorts ascending
    U = evecs[:, keep]
    return U @ U.T, rank


def _energy_rank(evals: Tensor, share: float) -> int:
    """How many of the ascending `evals` (of `C`) fit in `share · tr(C)`, smallest first.

    Raises:
        ValueError: none fit (a null space of rank 0).
    """
    r = int((torch.cumsum(evals, 0) <= share * evals.sum()).sum())
    if r == 0:
        raise ValueError(f"nullspace_energy {share} leaves a null space of rank 0 (the smallest eigenvalue alone is "
                         f"{float(evals[0] / evals.sum()):.3g} of tr(C)): no update could be made; raise it")
    return r


def energy_threshold(C: Tensor, share: float) -> float:
    """The eigenvalue threshold whose null space holds at most `share` of the keys' energy (what
    `nullspace_energy` records per layer; `null_space_projector(C, energy=share)` builds `P`).

    Args:
        C: the keys' second moment `E[k kᵀ]`, `[d_mlp, d_mlp]`, symmetric.
        share: the largest `tr(P C) / tr(C)` allowed, in (0, 1).

    Returns:
        `t` such that the eigenvalues of `C` below `t` are the `r` smallest and sum to at most
        `share · tr(C)` with `r` as large as possible: `t` lies midway between the `r`-th and
        `(r+1)`-th smallest eigenvalues (in `C`'s units); where they tie, `t` cannot separate
        them, and only `null_space_projector(C, energy=share)` has rank `r` for certain.

    Raises:
        ValueError: `share` is below the smallest eigenvalue's share of `tr(C)` (rank 0).
    """
    evals = torch.linalg.eigvalsh(C.double())
    r = _energy_rank(evals, share)
    if r == len(evals):  # only for C = 0
        return float("inf")
    return float(evals[r - 1] + evals[r]) / 2  # midway: robust to eigh and eigvalsh differing in the last bits


class AlphaEditSequence:
    """The keys of the AlphaEdit batches applied so far: per layer `K_p K_pᵀ` (`[d_mlp, d_mlp]`,
    float64) and the null-space projectors (with the threshold each implies), computed once
    per layer and reused.

    Pass it to `compute(..., sequence=seq)` for every batch of a sequence, and call
    `seq.record(model, edit)` after applying each batch: it adds the batch's keys, read on the
    model as it now is. Keys at layer `l` depend only on the layers below `l`, which are
    already edited when `compute` reads them, so these are the keys the solve used.

    Attributes:
        kkt: `{layer: K_p K_pᵀ}`.
        n_keys: keys recorded (one per request).

    Raises:
        ValueError: from `record` (an edit that is not AlphaEdit's, not applied, or recorded
            twice) and `check_fits` (keys of another width).
    """

    def __init__(self) -> None:
        self.kkt: dict[int, Tensor] = {}
        self.n_keys = 0
        self._recorded: set[str] = set()  # the model hashes the recorded edits were computed on
        self._projectors: dict[tuple, tuple[Tensor, int, float]] = {}

    def projector(self, layer: int, C: Tensor, threshold: float | None = None, *,
                  energy: float | None = None) -> tuple[Tensor, int, float]:
        """`(P, rank, threshold)`: `null_space_projector(C, threshold, energy=energy)` for
        `layer` and the eigenvalue threshold it stands for (`energy_threshold(C, energy)` for a
        share), computed once per statistics and setting."""
        Cd = C.double()
        key = (layer, threshold, energy, tuple(C.shape), float(Cd.sum()), float(Cd.diagonal().sum()))
        if key not in self._projectors:
            P, rank = null_space_projector(C, threshold, energy=energy)
            self._projectors[key] = (P, rank, threshold if energy is None else energy_threshold(C, energy))
        return self._projectors[key]

    def check_fits(self, model) -> None:
        """Refuse a sequence of keys of another width than `model`'s `d_mlp`.

        Raises:
            ValueError: a recorded `K_p K_pᵀ` that is not `[d_mlp, d_mlp]`.
        """
        d = int(model.cfg.d_mlp)
        bad = {l: tuple(k.shape) for l, k in self.kkt.items() if tuple(k.shape) != (d, d)}
        if bad:
            raise ValueError(f"sequence holds K_p K_pᵀ of shapes {bad}; this model's keys are [{d}, {d}]: another model's sequence?")

    @torch.no_grad()
    def record(self, model, edit: Edit) -> None:
        """Add the keys of `edit`'s requests at each of its layers (call after applying it).

        Raises:
            ValueError: `edit` is not an AlphaEdit edit, is not applied to `model`, or was
                recorded already.
        """
        if edit.method != "alphaedit":
            raise ValueError(f"edit of method {edit.method!r} is not an AlphaEdit edit; AlphaEditSequence records only those")
        if edit.model_hash in self._recorded:
            raise ValueError("this edit (computed on the same weights as one recorded before) is already in the sequence")
        if not any(a.method == "alphaedit" and a.model_hash == edit.model_hash for a in edit_stack(model)):
            raise ValueError("edit is not applied to this model: apply it first (edit.apply(model)), then record it, "
                             "so that its keys are read on the edited model")
        templates = edit.diagnostics["templates"]
        for layer in edit.layers:
            K = subject_keys(model, edit.requests, templates, layer).mean(1).double().T  # [d_mlp, n]
            self.kkt[layer] = self.kkt.get(layer, 0) + K @ K.T
        self.n_keys += len(edit.requests)
        self._recorded.add(edit.model_hash)


def _projector(hp: AlphaEditHParams, sequence: AlphaEditSequence, layer: int, C: Tensor) -> tuple[Tensor, int, float]:
    """`(P, rank, threshold)` for `layer` by `hp`'s rule: `nullspace_energy` when set, else `nullspace_threshold`."""
    threshold = hp.nullspace_threshold if hp.nullspace_energy is None else None
    return sequence.projector(layer, C, threshold, energy=hp.nullspace_energy)


def alphaedit_solve(hp: AlphaEditHParams, stats: dict[int, Tensor], sequence: AlphaEditSequence, info: dict):
    """AlphaEdit Eq. 14's left factor for layer `l`: `A = (P (K_p K_pᵀ + K Kᵀ + λ₀ C) + α I)⁻¹ P K`
    (`[d_mlp, n]` float64; `ΔW_out = A R`; `λ₀ = preserve_weight`, 0 in the paper). Records in `info[l]` the null-space rank and
    `unprotected_energy`, `tr(P C) / tr(C)`: the share of the preserved keys' second moment
    inside the edit space, which the update can still disturb (0 for an exact null space)."""

    def solve(layer: int, K: Tensor) -> Tensor:
        P, rank, threshold = _projector(hp, sequence, layer, stats[layer])
        P = P.to(K.device)
        prior = sequence.kkt.get(layer)
        gram = K @ K.T if prior is None else prior.to(K.device) + K @ K.T
        eye = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
        C = stats[layer].to(P)
        if hp.preserve_weight:
            gram = gram + hp.preserve_weight * C
        info[layer] = {"threshold": threshold, "nullspace_energy": hp.nullspace_energy, "rank": rank,
                       "d_mlp": K.shape[0],
                       "prior_keys": sequence.n_keys,
                       # tr(P C) / tr(C) (both symmetric: the elementwise sum): the share of the
                       # preserved keys' energy that P does not protect; 0 for a true null space
                       "unprotected_energy": float((P * C).sum() / C.trace())}
        return torch.linalg.solve(P @ gram + hp.alpha * eye, P @ K)

    return solve


def compute(
    model, requests, hparams: AlphaEditHParams | None = None, *, sequence: AlphaEditSequence | None = None,
    stats: dict[int, Tensor] | None = None, corpus: str | None = None, cache_dir: str | os.PathLike | None = None,
    device=None,
) -> Edit:
    """Compute AlphaEdit for a batch of requests; the model's weights are bit-identical when
    this returns or raises.

    AlphaEdit Eq. 14 per layer of `hparams.layers` (module docstring), on MEMIT's targets and
    layer spread. The null-space projectors are computed (and a rank-0 one refused) before
    the target optimisation starts.

    Args:
        model: a TransformerLens model.
        requests: `EditRequest`s (or CounterFact records / dicts).
        hparams: `AlphaEditHParams`; default `alphaedit_hparams(model)`.
        sequence: the `AlphaEditSequence` of the batches applied before this one (None: a
            first batch, `K_p K_pᵀ = 0`). Not changed here: `record` the edit once applied.
        stats: `{layer: C [d_mlp, d_mlp]}`; default loaded or computed over `corpus`.
        corpus: text for the statistics (default WikiText-2 test in `../shared/data`).
        cache_dir: cache root for statistics and context templates.
        device: where to compute; must be the model's device (the default).

    Returns:
        An `Edit` (not applied), as MEMIT's, whose diagnostics add `nullspace`:
        `{layer: {"threshold", "nullspace_energy", "rank", "d_mlp", "prior_keys", "unprotected_energy"}}`.

    Raises:
        ValueError: what `memit.compute` raises before anything runs; a `sequence` that is
            not an `AlphaEditSequence`; a threshold (or `nullspace_energy`) that leaves a null
            space of rank 0.
    """
    requests, hp = start_compute(model, "alphaedit", requests, hparams, preset=alphaedit_hparams,
                                 kind=AlphaEditHParams, stats=stats, device=device, cache_dir=cache_dir)
    if sequence is None:
        sequence = AlphaEditSequence()
    elif not isinstance(sequence, AlphaEditSequence):
        raise ValueError(f"sequence {sequence!r} must be an AlphaEditSequence (or None for a first batch)")
    sequence.check_fits(model)
    unrecorded = [a for a in edit_stack(model) if a.method == "alphaedit" and a.model_hash not in sequence._recorded]
    if unrecorded:
        log.warning("%d AlphaEdit edit(s) applied to the model are not in this sequence: their keys are not protected. "
                    "Pass the sequence they were recorded in (seq.record(model, edit) after each apply)", len(unrecorded))
    if isinstance(stats, Tensor) and len(hp.layers) == 1:  # one layer: its C alone, as ROME takes it
        stats = {hp.layers[0]: stats}
    bh, now_hash = edit_hashes(model)
    if stats is None:
        stats = layer_stats(model, list(hp.layers), corpus=corpus, n_tokens=hp.mom2_n_tokens, cache_dir=cache_dir, model_hash=bh)
    for layer in hp.layers:  # refuse a rank-0 null space before the (slow) optimisation
        _projector(hp, sequence, layer, stats[layer])
    templates = templates_for(model, hp.context_lengths, cache_dir=cache_dir, model_hash=bh)
    zs, curves, raw_targets = compute_zs(model, requests, hp, templates)
    info: dict[int, dict] = {}
    deltas, layer_info = spread_updates(model, requests, zs, hp, stats, templates, raw_targets,
                                        solve=alphaedit_solve(hp, stats, sequence, info))
    before = probe(model, requests)  # a no-grad pass last (see memit.compute)
    log.info("AlphaEdit null-space ranks %s, unprotected share of tr(C) %s", {l: i["rank"] for l, i in info.items()},
             {l: round(i["unprotected_energy"], 4) for l, i in info.items()})
    return Edit(
        method="alphaedit", requests=requests, deltas=deltas, hparams=hp, model_name=model_name(model),
        model_hash=now_hash,
        diagnostics={"before": before, "nll_curves": curves, "layers": layer_info, "templates": templates,
                     "nullspace": {str(l): i for l, i in info.items()}},
    )


def new_sequence() -> AlphaEditSequence:
    """A fresh, empty `AlphaEditSequence` (what the sequential runner starts a run with)."""
    return AlphaEditSequence()


edit_many, edit = conveniences(compute, "alphaedit")

__all__: Sequence[str] = ("AlphaEditHParams", "AlphaEditSequence", "alphaedit_hparams", "compute", "edit", "edit_many",
                          "energy_threshold", "new_sequence", "null_space_projector")
