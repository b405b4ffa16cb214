"""ROME: Rank-One Model Editing (Meng et al. 2022, Sec. 3, App. E).

One fact `(subject, relation) -> target_new` is written into `W_out` of one block as

    W_out += outer(u, v),   u = C⁻¹k* / ‖C⁻¹k*‖ ∈ R^{d_mlp},   v ∈ R^{d_model} from `right_vector`

in our `[d_mlp, d_model]` orientation (`out = k @ W_out`), which is the paper's
`Ŵ = W + Λ (C⁻¹k*)ᵀ` transposed. Here

- `k*` is the key (`blocks.{l}.mlp.hook_post`) at the last subject token, averaged over
  self-generated context templates (`editor.context`) and the bare prompt;
- `C = E[k kᵀ]` over text (`editor.stats`);
- `δ` is the change of the raw MLP output at that token found by gradient descent
  (`editor.optimize.optimize_values`) at the bare prompt, so `v* = W k₀ + δ`;
- `v` depends on which key the update is solved for (`ROMEHParams.key`, see
  `right_vector`): "original" (kmeng01/rome) maps the bare prompt's key `k₀` to
  `W k₀ + δ`; "r-rome" (Gupta et al. 2024, "Rebuilding ROME", as their code and EasyEdit
  implement it) maps the averaged `k*` to the optimised value `v* = W k₀ + δ`, so the key
  the direction `u` was built from is the key the value is solved for, which they show
  removes the norm blow-up and collapse of sequential edits; "mean-key-shift" maps `k*`
  to `W k* + δ`.

`compute` returns an `editor.Edit` and leaves the model's weights bit-identical (sequential
requests are applied temporarily and always undone); `edit` / `edit_many` compute, then apply.

Example:
    >>> from editor import rome, EditRequest
    >>> req = EditRequest(prompt="{} is located in the city of", subject="Eiffel Tower", target_new="Rome")
    >>> e = rome.compute(model, req)                 # nothing written yet
    >>> e.diagnostics["before"]["new_first"], e.diagnostics["steps"][0]["nll_curve"]
    >>> with e.applied(model):                       # written here, restored on exit
    ...     logits = model("The Eiffel Tower is located in the city of")
    >>> with rome.edit(model, req) as a:             # compute, then apply; restored on exit
    ...     print(a.diagnostics["after"]["new_first"])
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, Sequence

import torch
from torch import Tensor

from editor.checks import check_stats
from editor.common import conveniences, edit_hashes, probe, restoring_weights, start_compute, templates_for
from editor.edit import Edit
from editor.hparams import ROME_KEYS, ROMEHParams, one_of, rome_hparams
from editor.optimize import block_values, optimize_with, subject_keys
from editor.requests import EditRequest
from editor.result import LayerDelta
from editor.stats import layer_stats
from tracer.model import model_device, model_name, w_out

log = logging.getLogger(__name__)

HParams = ROMEHParams


# Re-exported for code that imported them from here (`editor.hparams.default_layer`,
# `benchmarks.sweep`, `benchmarks.edit_speed`); they live in `editor.common`.
__all__ = ["HParams", "base_hash", "compute", "compute_delta", "compute_factors", "edit", "edit_many", "probe",
           "right_vector", "rome_hparams", "templates_for"]


def right_vector(
    key: str, *, delta: Tensor, u: Tensor, k_star: Tensor, k_bare: Tensor, w: Tensor
) -> Tensor:
    """The right factor `v [d_model]` of `W_out += outer(u, v)` for one request.

    ROME Eq. 2 solved as a rank-one update (App. A), in our `[d_mlp, d_model]` orientation
    (`out = k @ W_out`), for the key choice `ROMEHParams.key`:

    - "original" (kmeng01/rome): `v = δ / (k₀·u)`: `k₀ ↦ k₀ W + δ`;
    - "r-rome" (Gupta et al. 2024, their code and EasyEdit): `v = (δ + (k₀ - k*) W) / (k*·u)`:
      `k* ↦ k₀ W + δ = v*`, the optimised value;
    - "mean-key-shift": `v = δ / (k*·u)`: `k* ↦ k* W + δ`.

    Args:
        key: one of `editor.hparams.ROME_KEYS`.
        delta: `[d_model]` optimised change of the raw MLP output at the bare prompt.
        u: `[d_mlp]` the unit left factor `C⁻¹k* / ‖C⁻¹k*‖`.
        k_star: `[d_mlp]` key averaged over the context templates.
        k_bare: `[d_mlp]` key of the bare prompt.
        w: `[d_mlp, d_model]` the `W_out` the factors are computed against (the current one:
            in `edit_many`'s sequential loop it holds the earlier requests' edits); only
            "r-rome" reads it.

    Returns:
        `v`, `[d_model]`.

    Raises:
        ValueError: for an unknown `key`.
    """
    if key == "original":
        return delta / (k_bare @ u)
    if key == "mean-key-shift":
        return delta / (k_star @ u)
    if key == "r-rome":
        return (delta + (k_bare - k_star) @ w.float()) / (k_star @ u)
    raise ValueError(f"key {key!r} must be one of {ROME_KEYS}")


def compute_factors(
    model,
    requests: Sequence[EditRequest],
    hp: ROMEHParams,
    *,
    C: Tensor,
    templates: Sequence[str],
    keys: Sequence[str] | None = None,
) -> list[dict]:
    """Rank-one factors for each request, each computed alone on the model as it is now.

    The requests are independent (no request sees another's edit); their value deltas are
    optimised together in one batch (`optimize_values`: per-request losses, per-element
    Adam and per-request early stopping, so a batch gives each request what it would get
    alone, up to float rounding). The model is not changed.

    `k*` is the key averaged over the context templates (ROME Sec. 3.1, Step 1), `δ` the
    value change found by the v* objective (ROME Eq. 4, `optimize_values`), `u` the unit
    `C⁻¹k*` of ROME Eq. 2 (or `k*` itself without `hp.mom2_adjustment`) and `v` from
    `right_vector`.

    Args:
        model: a TransformerLens model.
        requests: the edit requests.
        hp: `ROMEHParams`.
        C: `[d_mlp, d_mlp]` key second moment at `hp.layer`.
        templates: context templates, the bare `"{}"` first.
        keys: key choices to build `v` for (default `(hp.key,)`); all share `u` and `δ`.

    Returns:
        One dict per request: `u [d_mlp]`, `v {key: [d_model]}` and `info` (NLL curve in
        nats per step, `‖δ‖`, the original value's norm, `k·u` per key).

    Raises:
        ValueError: a key choice not in `ROME_KEYS` (before the optimisation runs).
    """
    layer = hp.layer
    keys = tuple(keys or (hp.key,))
    for k in keys:  # before the optimisation, not after it
        one_of("key", k, ROME_KEYS)
    K = subject_keys(model, requests, templates, layer)  # [n, templates, d_mlp]
    k_star = K.mean(1)  # averaged key k*, [n, d_mlp]
    k_bare = K[:, 0]  # templates[0] is the bare "{}"
    if hp.mom2_adjustment:
        U = torch.linalg.solve(C.double(), k_star.double().T).T.float()  # C⁻¹ k*, [n, d_mlp]
    else:
        U = k_star.clone()
    U = U / U.norm(dim=-1, keepdim=True)
    ref = block_values(model, requests, layer, "raw")  # original value at the bare prompt, [n, d_model]
    delta, curve = optimize_with(model, requests, hp, layer=layer, templates=templates, ref_norm=ref.norm(dim=-1))
    w = w_out(model, layer).detach()
    out = []
    for i in range(len(requests)):
        vecs = dict(delta=delta[i], u=U[i], k_star=k_star[i], k_bare=k_bare[i], w=w)
        out.append({
            "u": U[i],
            "v": {k: right_vector(k, **vecs) for k in keys},
            "info": {
                "nll_curve": [c[i] for c in curve],
                "delta_norm": float(delta[i].norm()),
                "value_norm": float(ref[i].norm()),
                "key_dot": {k: float((k_bare[i] if k == "original" else k_star[i]) @ U[i]) for k in keys},
            },
        })
    return out


def compute_delta(
    model,
    request: EditRequest,
    hp: ROMEHParams,
    *,
    C: Tensor,
    templates: Sequence[str],
) -> tuple[Tensor, Tensor, dict]:
    """The rank-one factors `(u [d_mlp], v [d_model])` for one request; the model is not changed.

    `compute_factors` for one request and the key choice `hp.key` (ROME Eq. 2).

    Args:
        model, hp, C, templates: as in `compute_factors` (`C` is `[d_mlp, d_mlp]`).
        request: the edit request.

    Returns:
        `(u [d_mlp], v [d_model], info)`, `info` as in `compute_factors` with `key_dot` the
        float for `hp.key`.

    Raises:
        ValueError: `hp.key` not in `ROME_KEYS`.
    """
    f = compute_factors(model, [request], hp, C=C, templates=templates)[0]
    info = {**f["info"], "key_dot": f["info"]["key_dot"][hp.key]}
    return f["u"], f["v"][hp.key], info


def compute(
    model,
    requests,
    hparams: ROMEHParams | None = None,
    *,
    stats: Tensor | Mapping[int, Tensor] | None = None,
    corpus: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    device=None,
) -> Edit:
    """Compute ROME for each request in turn (each on the model with the previous ones
    applied temporarily); the model's weights are bit-identical when this returns or raises.

    ROME Eq. 2 (App. A): the rank-one `Ŵ = W + Λ (C⁻¹k*)ᵀ` that maps `k*` to `v*`, in our
    `[d_mlp, d_model]` orientation `W_out += outer(u, v)` with `u = C⁻¹k* / ‖C⁻¹k*‖`
    (`[d_mlp]`) and `v` from `right_vector` (`[d_model]`); `v*` from ROME Eq. 4
    (`editor.optimize.optimize_values`). The r requests' factors are stacked into one
    `LayerDelta(u [d_mlp, r], v [r, d_model])` at `hparams.layer`.

    Args:
        model: a TransformerLens model.
        requests: `EditRequest`s (or CounterFact records / dicts), or one.
        hparams: `ROMEHParams`; default the preset for the model (`rome_hparams`; a model
            without one gets `default_layer`'s layer, cached under `cache_dir`).
        stats: `C = E[k kᵀ]` at the edit layer, `[d_mlp, d_mlp]`, or a `{layer: C}` dict holding
            it (as `layer_stats` returns for a list of layers); default loaded from the cache
            or computed over `corpus`. It must be finite and invertible (`check_stats`).
        corpus: text for the statistics (default WikiText-2 test in `../shared/data`).
        cache_dir: cache root for statistics, context templates and the default edit layer.
        device: where to compute; must be the model's device (the default).

    Returns:
        An `Edit` (not applied): `deltas {layer: LayerDelta}` and `diagnostics` with `before`
        (target probabilities), `steps` (per request: `nll_curve`, `delta_norm` ‖δ‖,
        `value_norm`, `key_dot` k·u) and `templates`.

    Raises:
        EditRequestError: (a `ValueError`) a malformed request (`as_requests`).
        ValueError: `hparams` is not a `ROMEHParams`, or a check in `editor.checks.check_edit`
            fails (layer out of range, device, conflicting requests, statistics of the wrong
            type, shape or dtype, non-finite or singular, too few statistics tokens, the last
            block for a prompt the subject does not end); nothing ran and no weight changed. Also: statistics computed or read
            from the cache that are singular (`check_stats`) or a corpus `layer_stats`
            refuses, and factors that come out non-finite (no weight was changed).

    Example:
        >>> e = rome.compute(model, EditRequest(prompt="{} is located in the city of",
        ...                                     subject="The Eiffel Tower", target_new="Rome"))
        >>> e.deltas[e.layers[0]].u.shape              # [d_mlp, 1]
    """
    requests, hp = start_compute(model, "rome", requests, hparams, preset=rome_hparams, kind=ROMEHParams,
                                 stats=stats, device=device, cache_dir=cache_dir)
    bh, now_hash = edit_hashes(model)
    if stats is None:
        C = layer_stats(model, hp.layer, corpus=corpus, n_tokens=hp.mom2_n_tokens, cache_dir=cache_dir, model_hash=bh)
        if hp.mom2_adjustment:
            check_stats(model, C, [hp.layer])  # computed or cached, it must be invertible too
    else:
        C = stats[hp.layer] if isinstance(stats, Mapping) else stats  # check_edit checked it
    C = C.to(model_device(model))
    templates = templates_for(model, hp.context_lengths, cache_dir=cache_dir, model_hash=bh)
    w = w_out(model, hp.layer)
    us, vs, infos = [], [], []
    with restoring_weights(model, [hp.layer]):  # the model is unchanged at the end, exceptions included
        for i, r in enumerate(requests):
            u, v, info = compute_delta(model, r, hp, C=C, templates=templates)
            if not (torch.isfinite(u).all() and torch.isfinite(v).all()):  # before it is written, even for a while
                raise ValueError(
                    f"ROME factors for request {i} ({r.filled!r} -> {r.target_new!r}) are not finite (k·u = "
                    f"{info['key_dot']:.3g}, |δ| = {info['delta_norm']:.3g}); no weight was changed. Check the key "
                    "statistics and hparams"
                )
            us.append(u)
            vs.append(v)
            infos.append(info)
            if len(requests) > 1:
                with torch.no_grad():
                    w.add_(torch.outer(u, v).to(w.dtype))  # later requests see this edit
            log.info("ROME %s -> %r: nll %s", r.subject, r.target_new, info["nll_curve"][-1])
    # probed last, on the (restored) unedited weights: the same numbers as before the optimisation, and a
    # no-grad pass, so a TransformerLens 4 bridge, which keeps each attention block's last pattern, does not
    # hold on to the optimisation's autograd graph (which also made copy.deepcopy(model) fail)
    before = probe(model, requests)
    delta = LayerDelta(u=torch.stack(us, 1), v=torch.stack(vs, 0))  # [d_mlp, r], [r, d_model]
    return Edit(
        method="rome", requests=requests, deltas={hp.layer: delta}, hparams=hp, model_name=model_name(model),
        model_hash=now_hash, diagnostics={"before": before, "steps": infos, "templates": templates},
    )


edit_many, edit = conveniences(compute, "rome")
