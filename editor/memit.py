"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al. 2022b).

For a batch of requests, over a range of blocks `layers = (l_1 .. L)`:

1. `z_i`: the residual after block `L` at request i's last subject token that makes the
   model say `target_new`. We optimise a delta `δ_i` on block `L`'s raw MLP output
   (`tracer.mlp_output_delta`, as the paper's `compute_z` adds it at that layer) and read
   `z_i` = `blocks.L.hook_resid_post` with `δ_i` applied. For GPT-style models this is
   `h_L + δ_i`; for Gemma, whose MLP output is normalised (`ln2_post`) before it joins the
   residual, it is the exact residual the raw delta produces.
2. For each layer `l` in order: keys `K` (`[d_mlp, n]`, averaged over context templates),
   the current residual `h_L` (bare prompts, with the earlier layers already updated),
   `R = (z - h_L) / (layers left)`, and the least-squares update of the paper,
   `Δ = R Kᵀ (λC + K Kᵀ)⁻¹`, which in our `[d_mlp, d_model]` orientation is
   `ΔW_out = (λC + K Kᵀ)⁻¹ K Rᵀ` (stored as factors `A = (λC + KKᵀ)⁻¹K`, `B = Rᵀ`).
   When block `l` has a post-MLP norm, the residual change `R` is turned into the raw-output
   change that produces it (a few Gauss-Newton steps through the norm).
   The update is applied before the next layer's keys and residuals are computed.
3. All updates are undone: `compute` returns them as an `editor.Edit` (the model's weights
   bit-identical, exceptions included), which `Edit.apply` (or `edit_many`) writes together.

`hparams.spread="joint"` (the Gemma-3-270m preset) replaces the equal residual shares of
step 2: step 1 optimises one raw-output delta per layer together against the same loss
(weight decay spreads the change over the layers, and each delta is clamped against its
layer's raw output norm), `z` is the residual that all of them produce, every layer but the
last is asked for its own delta, and the last also takes whatever the earlier layers fell
short of `z`. On a model that normalises its MLP outputs a residual share can lie beyond what
a layer can add; its own delta never does.

Example:
    >>> from editor import memit
    >>> e = memit.compute(model, requests)       # hundreds of requests are fine; nothing written
    >>> e.diagnostics["layers"][-1]["resid_norm_after"]
    >>> with e.applied(model):
    ...     ...                                  # all requests edited here
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from editor.common import conveniences, edit_hashes, probe, restoring_weights, start_compute, templates_for
from editor.edit import Edit
from editor.hparams import MEMITHParams, memit_hparams
from editor.optimize import block_values, optimize_with, shifted_mlp_outputs, subject_keys
from editor.requests import EditRequest
from editor.result import LayerDelta
from editor.stats import layer_stats
from tracer.batching import pad_tokens
from tracer.hooks import hook_name
from tracer.model import mlp_post_norm, model_device, model_name, run_until, w_out
from tracer.prompts import locate_subject

log = logging.getLogger(__name__)

HParams = MEMITHParams


def _pinv(jac: Tensor) -> Tensor:
    """`torch.linalg.pinv(jac, rtol=1e-6)`, retried in float64 where the float32 SVD does not
    converge (it failed on an ill-conditioned Jacobian of Gemma's norm in a 100-request zsRE
    batch); the float32 result is kept wherever it exists, so earlier runs are unchanged."""
    try:
        return torch.linalg.pinv(jac, rtol=1e-6)
    except torch.linalg.LinAlgError:
        if jac.dtype == torch.float64:
            raise
        log.warning("float32 SVD of the norm's Jacobian did not converge; retrying in float64")
        return torch.linalg.pinv(jac.double(), rtol=1e-6).to(jac.dtype)


def _raw_change(norm, raw: Tensor, resid: Tensor, iters: int = 8) -> Tensor:
    """Raw-output change `r` with `norm(raw + r)` as close as it can get to `norm(raw) + resid`.

    Gauss-Newton (least-norm steps) for each row. A post-MLP norm (Gemma's RMSNorm) is scale
    invariant: its outputs lie on a fixed surface, so a wanted output off that surface cannot
    be reached, and plain Gauss-Newton then diverges (the step grows as the input grows along
    the null direction). So every step is capped at half the input's norm, and the input is
    kept at the norm of `raw`, which changes no output and keeps the raw values at their scale:
    the iteration settles on the reachable output nearest the wanted one.

    `raw`, `resid`: `[n, d_model]`. Returns `[n, d_model]`.
    """
    raw = raw.detach().float()
    want = norm(raw).detach() + resid
    size = raw.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [n, 1]
    x = raw.clone()
    for _ in range(iters):
        xg = x.detach().requires_grad_(True)
        # rows are independent, so the Jacobian of the row-sum gives each row's block
        jac = torch.autograd.functional.jacobian(lambda t: norm(t).sum(0), xg)  # [d, n, d]
        jac = jac.permute(1, 0, 2)  # [n, d_out, d_in]
        err = (want - norm(x).detach()).unsqueeze(-1)  # [n, d, 1]
        step = (_pinv(jac) @ err)[..., 0]  # [n, d]
        cap = 0.5 * size / step.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        x = x + step * cap.clamp(max=1.0)
        x = x * (size / x.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return x - raw


def compute_zs(model, requests: Sequence[EditRequest], hp: MEMITHParams, templates: Sequence[str]):
    """Target residuals `z [n, d_model]` at the last layer, the NLL curves, and (with
    `hp.spread == "joint"`) each layer's raw-output delta `{layer: [n, d_model]}`, else None.
    """
    top = hp.layers[-1]
    joint = hp.spread == "joint"
    opt_layers = tuple(hp.layers) if joint else top
    zs, curves, raws = [], [], []
    chunks = range(0, len(requests), hp.z_batch_size)
    for b in tqdm(chunks, desc="MEMIT z", disable=len(chunks) < 2):
        chunk = list(requests[b : b + hp.z_batch_size])
        if joint:  # each layer's raw MLP output norm
            ref = torch.stack([block_values(model, chunk, l, "raw").norm(dim=-1) for l in hp.layers], 1)
        else:  # residual norm: the paper's clamp reference
            ref = block_values(model, chunk, top, "resid").norm(dim=-1)
        delta, curve = optimize_with(model, chunk, hp, layer=opt_layers, templates=templates, ref_norm=ref)
        if not joint:
            delta = delta[:, None]  # [n, 1, d_model]
        zs.append(_resid_with(model, chunk, opt_layers if joint else (top,), delta))
        raws.append(delta)
        curves += [[c[i] for c in curve] for i in range(len(chunk))]
    raw = torch.cat(raws)
    per_layer = {l: raw[:, j] for j, l in enumerate(hp.layers)} if joint else None
    return torch.cat(zs), curves, per_layer


@torch.no_grad()
def _resid_with(model, requests, layers: Sequence[int], delta: Tensor) -> Tensor:
    """Residual after the last of `layers` at the last subject token with `delta[:, j]`
    added to block `layers[j]`'s raw MLP output; `delta`: `[n, len(layers), d_model]`."""
    device = model_device(model)
    ps = [locate_subject(model, r.prompt, r.subject) for r in requests]
    tokens = pad_tokens(model, [p.ids for p in ps], device)
    pos = torch.tensor([p.last_subject for p in ps], device=device)
    rows = torch.arange(len(ps), device=device)
    with shifted_mlp_outputs(model, layers, (rows, pos), delta):
        h = run_until(model, tokens, hook_name("resid", layers[-1]))
    return h[rows, pos].float()


def memit_solve(hp: MEMITHParams, stats: dict[int, Tensor]):
    """MEMIT Eq. 14's left factor for layer `l`: `A = (λC + K Kᵀ)⁻¹ K`, `[d_mlp, n]` float64,
    so that `ΔW_out = A R` (`K`: `[d_mlp, n]` float64 keys)."""

    def solve(layer: int, K: Tensor) -> Tensor:
        C = stats[layer].to(K.device).double()
        return torch.linalg.solve(hp.mom2_update_weight * C + K @ K.T, K)

    return solve


def spread_updates(
    model, requests, zs: Tensor, hp: MEMITHParams, stats: dict[int, Tensor], templates,
    raw_targets: dict[int, Tensor] | None = None, solve=None,
):
    """Step 2 of the method: per-layer least-squares updates towards the targets `zs`.

    With `raw_targets` (`spread="joint"`), every layer but the last is asked for its own
    raw-output change `raw_targets[l]`; the last is asked for the residual change left to
    `zs`, as in the paper. Each layer's update is applied before the next layer's keys and
    residuals are computed, and all are undone before returning. Returns `({layer: LayerDelta}, per-layer info)`;
    the info records the mean `|z - h|` before each layer and the fraction of the wanted
    residual change that the layer's update achieved on the bare prompts. `solve(layer, K)`
    gives each layer's left factor `A` (`ΔW_out = A R`); default `memit_solve` (AlphaEdit
    passes its null-space-projected solve).
    """
    solve = solve or memit_solve(hp, stats)
    dev = model_device(model)
    top = hp.layers[-1]
    deltas: dict[int, LayerDelta] = {}
    layer_info = []
    with restoring_weights(model, hp.layers):  # unchanged at the end of delta computation, exceptions included
        for i, l in enumerate(hp.layers):
            K = subject_keys(model, requests, templates, l).mean(1)  # [n, d_mlp], averaged k
            h = block_values(model, requests, top, "resid")  # current residual at L, [n, d_model]
            own = raw_targets is not None and l != top
            R = raw_targets[l].to(dev) if own else (zs - h) / (len(hp.layers) - i)  # change wanted from layer l
            norm = mlp_post_norm(model, l)
            if norm is not None and not own:
                raw = K @ w_out(model, l).float()  # raw MLP output of the averaged key
                b_out = getattr(model.blocks[l].mlp, "b_out", None)
                if isinstance(b_out, Tensor):
                    raw = raw + b_out.float()
                R = _raw_change(norm, raw, R)
            A = solve(l, K.double().T).float()  # [d_mlp, n]
            d = LayerDelta(u=A, v=R.float())  # ΔW_out = A @ R, [d_mlp, d_model]
            deltas[l] = d
            dw = d.matrix()
            with torch.no_grad():
                w = w_out(model, l)
                w.copy_((w.float() + dw).to(w.dtype))  # rounded once, as apply_deltas writes it
            # K A is how much of each row's wanted raw change the regularised solve delivers
            reach = torch.diagonal(K @ A).mean()
            layer_info.append({
                "layer": l,
                "resid_norm": float((zs - h).norm(dim=-1).mean()),
                "update_norm": float(dw.norm()),
                "key_reach": float(reach),
            })
            log.info("MEMIT layer %d: mean |z - h| %.3f, |Δ| %.4f, reach %.3f", l, layer_info[-1]["resid_norm"], layer_info[-1]["update_norm"], reach)
        h = block_values(model, requests, top, "resid")  # with every update applied
        layer_info[-1]["resid_norm_after"] = float((zs - h).norm(dim=-1).mean())
    return deltas, layer_info


def compute(
    model,
    requests,
    hparams: MEMITHParams | None = None,
    *,
    stats: dict[int, Tensor] | None = None,
    corpus: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    device=None,
) -> Edit:
    """Compute MEMIT for a batch of requests; the model's weights are bit-identical when this
    returns or raises.

    MEMIT Eq. 14, per layer `l` of `hparams.layers`: `Δ = R Kᵀ (λC + K Kᵀ)⁻¹`, in our
    `[d_mlp, d_model]` orientation `ΔW_out = (λC + K Kᵀ)⁻¹ K Rᵀ`, kept factored as
    `LayerDelta(u=A [d_mlp, n], v=Rᵀ [n, d_model])` with `A = (λC + KKᵀ)⁻¹K`; `K [d_mlp, n]`
    are the keys averaged over context templates, `R` the residual change asked of the layer
    (towards the targets `z` of MEMIT Eq. 16, `compute_zs`), `C` the key second moment.

    Args:
        model: a TransformerLens model.
        requests: `EditRequest`s (or CounterFact records / dicts).
        hparams: `MEMITHParams`; default the preset for the model.
        stats: `{layer: C [d_mlp, d_mlp]}` for every edited layer; default loaded or computed
            over `corpus`.
        corpus: text for the statistics (default WikiText-2 test in `../shared/data`).
        cache_dir: cache root for statistics and context templates.
        device: where to compute; must be the model's device (the default).

    Returns:
        An `Edit` (not applied) with rank-n factors per layer; `diagnostics` has `before`,
        `nll_curves` (per request), `layers` (per layer: `resid_norm` |z − h|,
        `update_norm` ‖ΔW‖, `key_reach`; the last also `resid_norm_after`) and `templates`.

    Raises:
        ValueError: before anything runs (`editor.checks.check_edit`): hparams that are not
            `MEMITHParams`, a layer out of range, requests that ask for different targets
            after the same prompt, stats that are missing a layer, misshapen or not finite,
            `mom2_n_tokens` below `d_mlp`, or a top layer at the last block (residual spread)
            for a prompt the subject does not end.

    Example:
        >>> e = memit.compute(model, [EditRequest.from_counterfact(r) for r in records[:100]])
        >>> e.save("memit100.safetensors")
    """
    requests, hp = start_compute(model, "memit", requests, hparams, preset=memit_hparams, kind=MEMITHParams,
                                 stats=stats, device=device, cache_dir=cache_dir)
    bh, now_hash = edit_hashes(model)
    if stats is None:
        stats = layer_stats(model, list(hp.layers), corpus=corpus, n_tokens=hp.mom2_n_tokens, cache_dir=cache_dir, model_hash=bh)
    templates = templates_for(model, hp.context_lengths, cache_dir=cache_dir, model_hash=bh)
    zs, curves, raw_targets = compute_zs(model, requests, hp, templates)  # [n, d_model]
    deltas, layer_info = spread_updates(model, requests, zs, hp, stats, templates, raw_targets)
    # probed last, on the (restored) unedited weights: the same numbers as before the optimisation, and a
    # no-grad pass, so a TransformerLens 4 bridge, which keeps each attention block's last pattern, does not
    # hold on to the optimisation's autograd graph (which also made copy.deepcopy(model) fail)
    before = probe(model, requests)
    return Edit(
        method="memit", requests=requests, deltas=deltas, hparams=hp, model_name=model_name(model),
        model_hash=now_hash,
        diagnostics={"before": before, "nll_curves": curves, "layers": layer_info, "templates": templates},
    )


edit_many, edit = conveniences(compute, "memit")
