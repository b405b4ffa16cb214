"""Attribution patching: a first-order estimate of every causal-tracing cell from gradients.

Causal tracing (`tracer.trace`) runs the corrupted model once per restored (token, layer)
cell and noise sample. Attribution patching (Nanda 2023, "Attribution Patching: Activation
Patching At Industrial Scale"; Kramár et al. 2024, "AtP*") replaces each of those runs by a
linear estimate from **one corrupted forward and backward pass per noise sample**: restoring
the clean value `a_clean` of an activation `a` changes the metric `m` by about

    Δm ≈ (a_clean − a_corrupted) · ∂m/∂a        (evaluated on the corrupted run)

For the three kinds of `tracer.trace`, cell `(t, l)`:

- `"resid"`: `a` is `blocks.l.hook_resid_post` at token `t`;
- `"mlp"` / `"attn"`: the sum of the `hook_mlp_out` / `hook_attn_out` terms at token `t` over the
  window `window_layers(l, window, n_layers)` (a first-order estimate is additive, so the
  window's joint restoration is estimated by the sum of its layers').

Two estimates (`METHODS`), both on the scale of the exact `scores`:

- `"atp"`: the expansion above of the metric itself (the target probability, or your
  metric): `low + mean over samples of Δm`. For a probability this is `p · Δ log p` to
  first order, so it underestimates large restorations: a cell that takes p from 0.03 to
  0.3 (Δ log p = 2.3) is estimated at 0.03 · 2.3 = 0.07.
- `"atp-logp"` (ours; the default probability metric only): the same expansion of
  `log p(target)`, mapped back through the exponential, sample by sample:
  `mean over samples of min(1, p_s · exp(Δ log p_s))`. It costs the same single backward
  pass. On Gemma-3-270m's 490 known facts its average MLP curve is roughly the exact
  trace's size (peak 0.113 against 0.090; `"atp"` peaks at 0.016; docs/tracing.md).

Tokens before the first corrupted one are `low` exactly, as in the exact trace. These are
**estimates**: restorations that need several components at once, or that saturate, are
still missed (AtP*'s first failure mode). Every result made here says so
(`TraceResult.method` is the estimate's name). Severed paths and `metric_at` are not
estimated.

Example:
    >>> from tracer.trace import prepare_runs
    >>> runs = prepare_runs(model, "The Eiffel Tower is located in the city of", "Eiffel Tower")
    >>> est = attribution_scores(model, runs)          # {"resid": [pos, layer], "mlp": ..., "attn": ...}
    >>> calibrated = attribution_scores(model, runs, method="atp-logp")
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from tracer.hooks import EMBED, KINDS, hook_name, hooks
from tracer.model import final_logits, final_resid
from tracer.patching import noise_hook

METHODS = ("exact", "atp", "atp-logp")
ESTIMATES = ("atp", "atp-logp")  # the methods whose results are attribution-patching estimates


def check_method(method: str) -> str:
    """`method` if it is one of `METHODS`.

    Raises:
        ValueError: any other value.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is unknown; expected one of {METHODS} ('atp', 'atp-logp': "
                         "attribution-patching estimates)")
    return method


def is_estimate(method: str | None) -> bool:
    """Whether results of `method` are attribution-patching estimates (labelled as such)."""
    return method in ESTIMATES


def estimate_label(method: str | None) -> str:
    """How titles name an estimate: "AtP estimate" or "AtP estimate, log p"; "" for exact."""
    return {"atp": "AtP estimate", "atp-logp": "AtP estimate, log p"}.get(method, "")


def attribution_scores(
    model,
    runs,
    *,
    kinds: Sequence[str] = KINDS,
    window: int = 10,
    metric=None,
    method: str = "atp",
) -> dict[str, Float[Tensor, "pos layer"]]:
    """AtP estimates of `restore_scores` for each kind, from one backward pass per sample.

    All noise samples go through the model as one batch (memory grows with `samples`;
    `trace_prompt`'s `batch_size` does not apply); the rows are independent, so the
    gradient of the summed metric gives each sample's own gradient.

    Args:
        model: the model `runs` came from (either TransformerLens API).
        runs: `tracer.trace.prepare_runs` output (clean and corrupted states, the noise).
        kinds: any of "resid", "mlp", "attn".
        window: layers per mlp/attn window, as in `trace_prompt`.
        metric: None for the target probability, else a `tracer.trace.Metric` of the last
            position's logits `[batch, 1, d_vocab]` returning `[batch]`.
        method: "atp" (the metric expanded to first order) or "atp-logp" (`log p` expanded
            and mapped back by `exp`, capped at 1; the probability metric only). See the
            module docstring.

    Returns:
        `{kind: [pos, layer]}` float32 estimated scores (probability, or metric units).

    Raises:
        ValueError: an unknown kind or method, `window` < 1, a metric that does not return
            finite `[batch]` values, or one without a gradient (argmax, a comparison,
            `.detach()`), or `method="atp-logp"` with a metric.
    """
    from tracer.trace import _checked, metric_bounds, window_layers  # noqa: PLC0415  (tracer.trace imports this module)

    if method not in ESTIMATES:
        raise ValueError(f"method {method!r} is not an attribution-patching estimate; expected one of {ESTIMATES}")
    if method == "atp-logp" and metric is not None:
        raise ValueError("method 'atp-logp' expands log p(target) and needs the default probability metric; "
                         "with a metric use method='atp'")
    kinds = tuple(kinds)
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds {kinds!r} must be a non-empty subset of {KINDS}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window {window!r} must be an integer >= 1")
    n = model.cfg.n_layers
    tokens = runs.corrupt_tokens  # [S, pos]
    samples, n_pos = tokens.shape
    names = {(k, l): hook_name(k, l) for k in kinds for l in range(n)}
    acts: dict[tuple[str, int], Tensor] = {}

    def keep(key):
        def hook(act, hook):
            acts[key] = act
            return act

        return hook

    def leaf(act, hook):  # gradients start here: none are accumulated into the weights
        return act.detach().requires_grad_(True)

    fwd = [(EMBED, noise_hook(runs.prompt.subject, runs.embed_delta))] if runs.embed_delta is not None else []
    fwd += [(EMBED, leaf)] + [(name, keep(key)) for key, name in names.items()]
    with torch.enable_grad(), hooks(model, fwd):
        resid = final_resid(model, tokens)[:, -1]  # [S, d_model]
        logits = final_logits(model, resid)
        logits = logits.double() if logits.dtype == torch.float64 else logits.float()
        if metric is None:
            logp = logits[:, runs.target_id] - logits.logsumexp(-1)
            m = logp if method == "atp-logp" else logp.exp()
        else:
            m = _checked(metric(logits[:, None]), samples)
            if not m.requires_grad:
                raise ValueError("metric must be differentiable for method='atp' (it returned a tensor without a "
                                 "gradient, e.g. from argmax, a comparison or .detach()); use method='exact'")
        keys = list(acts)
        grads = torch.autograd.grad(m.sum(), [acts[k] for k in keys], allow_unused=True)
    grad = dict(zip(keys, grads))
    low = metric_bounds(model, runs, metric)[1]

    p = m.detach().double().exp().cpu() if method == "atp-logp" else None  # [S] corrupted p(target)

    def term(kind: str, layer: int) -> Tensor:  # [S, pos]: (clean - corrupted) . grad, per sample
        a, g = acts[(kind, layer)].detach().double(), grad[(kind, layer)]
        if g is None:  # the activation does not reach the metric
            return torch.zeros(samples, n_pos, dtype=torch.float64)
        clean = runs.clean_pre[layer + 1] if kind == "resid" else runs.clean_sub[kind][layer]  # [pos, d]
        return ((clean.double()[None] - a) * g.double()).sum(-1).cpu()

    out = {}
    for kind in kinds:
        per_layer = torch.stack([term(kind, l) for l in range(n)], -1)  # [S, pos, layer]
        if kind != "resid":
            per_layer = torch.stack([per_layer[..., list(window_layers(l, window, n))].sum(-1) for l in range(n)], -1)
        if method == "atp-logp":
            est = (p[:, None, None] * per_layer.exp()).clamp(max=1.0).mean(0)
        else:
            est = low + per_layer.mean(0)
        est[: runs.first_changed] = low  # an unchanged state: restoring it is a no-op, exactly
        out[kind] = est.float()
    return out
