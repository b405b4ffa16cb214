"""FT-L: constrained fine-tuning of one layer's `W_out` (the ROME paper's FT+L baseline).

A dense delta `Δ [d_mlp, d_model]` is optimised with Adam on the NLL of `target_new` after
each edit prompt, applied as `out + key @ Δ` on the raw MLP output (`tracer.mlp_output_delta`,
with the key from `blocks.{l}.mlp.hook_post`), and clamped to `|Δ_ij| ≤ norm_constraint`
after every step (the paper's L∞ constraint). `compute` returns `Δ` as an `editor.Edit`
(the model is not changed); applying it writes `W_out += Δ`.

`layer_grad_norms` reports the gradient norm of every layer's `W_out` on the edit loss
(zero deltas at each layer, one backward pass), to compare with the causal-tracing location.

Example:
    >>> from editor import ft
    >>> e = ft.compute(model, req)          # nothing written yet
    >>> e.diagnostics["grad_norms"]          # per-layer ‖∂NLL/∂W_out‖ of the unedited model
    >>> with e.applied(model):
    ...     ...
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Sequence

import torch
from torch import Tensor

from editor.common import conveniences, probe, start_compute
from editor.edit import Edit
from editor.hparams import FTHParams, ft_hparams
from editor.requests import EditRequest, as_requests
from editor.result import LayerDelta
from tracer.batching import pad_tokens, pick, position_log_probs, teacher_forced
from tracer.hooks import hook_name
from tracer.model import mlp_output_delta, model_device, model_name, weights_hash
from tracer.prompts import encode, target_ids

log = logging.getLogger(__name__)

HParams = FTHParams


def _batch(model, requests: Sequence[EditRequest]):
    """`(tokens, rows, cols, targets)`: each edit prompt with `target_new`, teacher forced."""
    device = model_device(model)
    tf = teacher_forced([(encode(model, r.filled), target_ids(model, r.filled, r.target_new)) for r in requests], feed_last=False)
    return pad_tokens(model, tf.seqs, device), tf.rows_tensor(device), tf.cols_tensor(device), tf.targets_tensor(device)


def _nll(model, batch, deltas: dict[int, Tensor]) -> Tensor:
    """Mean NLL of the target tokens with `out + key @ Δ_l` at each layer in `deltas`."""
    tokens, rows, cols, tgt = batch
    keys: dict[int, Tensor] = {}

    def keep(layer):
        def f(act, hook):
            keys[layer] = act
        return f

    with contextlib.ExitStack() as stack:
        stack.enter_context(model.hooks(fwd_hooks=[(hook_name("key", l), keep(l)) for l in deltas]))
        for l, d in deltas.items():
            # Δ is float32 whatever the model's dtype: the product is formed in float32 and
            # cast where it is added (a bf16 / fp16 key times a float32 Δ would not multiply)
            add = lambda out, l=l, d=d: out + (keys[l].to(d.dtype) @ d).to(out.dtype)  # noqa: E731
            stack.enter_context(mlp_output_delta(model, l, add))
        lp = position_log_probs(model, tokens, rows, cols)  # [m, d_vocab]
    return -pick(lp, tgt).mean()


def layer_grad_norms(model, requests) -> list[float]:
    """`‖∂ NLL / ∂ W_out[l]‖` for every layer `l`, on the edit loss of `requests`.

    The loss is FT-L's: the mean NLL (nats per target token) of each request's `target_new`
    after its bare prompt; the gradients are taken at zero deltas on the unedited model, in
    one backward pass, to compare with where causal tracing locates the fact.

    Args:
        model: a TransformerLens model with a tokenizer.
        requests: an `EditRequest` or several.

    Returns:
        `[n_layers]` Frobenius norms of the gradient w.r.t. each layer's `W_out`
        (`[d_mlp, d_model]`), in nats per unit weight.

    Raises:
        ValueError: requests `as_requests` refuses, or a prompt or target `encode` /
            `target_ids` refuse (empty, longer than `n_ctx`).

    Example:
        >>> int(torch.tensor(layer_grad_norms(model, req)).argmax())     # the steepest layer
    """
    requests = as_requests(requests)
    dev = model_device(model)
    zeros = {
        l: torch.zeros(model.cfg.d_mlp, model.cfg.d_model, device=dev, requires_grad=True)
        for l in range(model.cfg.n_layers)
    }
    _nll(model, _batch(model, requests), zeros).backward()
    return [float(zeros[l].grad.norm()) for l in range(model.cfg.n_layers)]


def compute(
    model,
    requests,
    hparams: FTHParams | None = None,
    *,
    stats=None,
    corpus: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    device=None,
) -> Edit:
    """Fine-tune `W_out` of one layer under an L∞ constraint on all requests together; the
    model's weights are bit-identical when this returns or raises.

    FT-L (the ROME paper's FT+L baseline, Sec. 4, after Zhu et al. 2020): minimise the mean
    NLL of the new targets over a dense `Δ [d_mlp, d_model]` added as `out + k @ Δ` (so
    `W_out + Δ`), with `|Δ_ij| ≤ norm_constraint` after every Adam step. `Δ` is optimised in
    float32 on a model of any dtype and rounded once, to the weights' dtype, when applied.

    Takes the same keywords as `rome.compute` and `memit.compute`, so a caller (the benchmark
    runner) can pass them uniformly; any other keyword is a `TypeError`.

    Args:
        model: a TransformerLens model.
        requests: `EditRequest`s.
        hparams: `FTHParams`; default the preset for the model.
        stats, corpus: accepted and unused (FT-L needs no key statistics);
        cache_dir: where a model without a preset keeps its chosen edit layer.
        device: where to compute; default (and only) the model's device.

    Returns:
        An `Edit` (not applied) with a dense delta; `diagnostics` has `before`, `nll_curve`
        and `grad_norms` (the per-layer gradient norms of the unedited model).

    Raises:
        ValueError: bad hparams, layer, device or conflicting requests (`editor.checks`), or
            a prompt or target `encode` / `target_ids` refuse (empty, longer than `n_ctx`).
        TypeError: a keyword other than those above.

    Example:
        >>> e = ft.compute(model, requests, FTHParams(layer=4)); e.deltas[4].dense.abs().max()
    """
    del stats, corpus  # the shared keyword set; FT-L needs no key statistics
    requests, hp = start_compute(model, "ft-l", requests, hparams, preset=ft_hparams, kind=FTHParams, device=device,
                                 cache_dir=cache_dir)
    now_hash = weights_hash(model)
    grads = layer_grad_norms(model, requests)
    batch = _batch(model, requests)
    dev = model_device(model)
    delta = torch.zeros(model.cfg.d_mlp, model.cfg.d_model, device=dev, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.lr)
    curve = []
    for step in range(hp.num_steps):
        opt.zero_grad()
        loss = _nll(model, batch, {hp.layer: delta})
        curve.append(round(float(loss.detach()), 5))
        if loss.item() < hp.early_stop_nll:
            break
        loss.backward()
        opt.step()
        with torch.no_grad():
            delta.clamp_(-hp.norm_constraint, hp.norm_constraint)
    # probed last, on the (restored) unedited weights: the same numbers as before the optimisation, and a
    # no-grad pass, so a TransformerLens 4 bridge, which keeps each attention block's last pattern, does not
    # hold on to the optimisation's autograd graph (which also made copy.deepcopy(model) fail)
    before = probe(model, requests)
    return Edit(
        method="ft-l", requests=requests, deltas={hp.layer: LayerDelta(dense=delta.detach().clone())}, hparams=hp,
        model_name=model_name(model), model_hash=now_hash,
        diagnostics={"before": before, "nll_curve": curve, "grad_norms": grads},
    )


edit_many, edit = conveniences(compute, "ft")
