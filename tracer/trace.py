"""Causal tracing (Meng et al. 2022, section 2): which hidden states carry a fact.

Three runs of the model on one prompt:

1. **clean**: record every hidden state;
2. **corrupted**: add Gaussian noise to the subject's token embeddings (at `hook_embed`),
   `samples` times with the same seeded noise tensor reused by every condition below;
3. **corrupted with restoration**: the corrupted run, with some clean states copied back.

The score of a condition is the probability of the target token (the first token of the
answer) at the last position, averaged over the noise samples. `high` is the clean score,
`low` the corrupted score; `scores[t, l] - low` is the *indirect effect* of the state.
`metric=` replaces the probability by any function of the last position's logits (e.g. a
logit difference; see `trace_prompt`). The corruption and the restorations are also
available as plain TransformerLens hooks in `tracer.patching` (docs/interop.md).

Kinds of restored state, for token `t` and layer `l`:

- `"resid"`: the residual stream after block `l` (`blocks.l.hook_resid_post`);
- `"mlp"` / `"attn"`: the MLP / attention output at `t` in the `window` layers centred on
  `l`, `range(max(0, l - window // 2), min(n_layers, l - (-window // 2)))`, as the paper.

`severed="mlp"|"attn"` (paper, Figure 3) restores the residual state at `(t, l)` while the
named sublayer at token `t` is held at its corrupted-run value in every later layer
(`l+1 .. n_layers-1`); the reference code freezes all layers `0..n-1` at that token, but
layers `<= l` are upstream of the restored state, so freezing them changes nothing.

**Fast path.** Every condition shares the corrupted prefix, so the corrupted residual
stream is cached once, and each restored run resumes from `start_at_layer`: restoring
`resid` at layer `l` starts block `l+1` from the corrupted `resid_post[l]` with token `t`
overwritten by its clean value; an `mlp`/`attn` window starting at layer `a` starts there.
Conditions (token x layer x sample) sharing a start layer go through the model in batches
of at most `batch_size` rows. Only the last position is unembedded. Tokens before the first
corrupted token carry identical clean and corrupted states, so restoring them is a no-op;
their scores are set to `low` without running anything (exact). Positions before the
restored token are unchanged too: the corrupted run's keys and values are recorded
(`tracer.model.prefix_kv_cache`) and a restored run at token `t` computes only positions
`t..` (`tracer.model.resume_with_prefix`). On TransformerLens 3.x that is the
`HookedTransformer`'s own cache; on a 4.x bridge a `transformers` `DynamicCache`, with the
blocks before the start layer skipped, after a once-per-model check that both reproduce
the plain pass (where it fails, every position and block is run, as before).

Example:
    >>> from tracer import load_model
    >>> from tracer.trace import trace_prompt
    >>> model = load_model("gemma-3-270m")
    >>> res = trace_prompt(model, "The Eiffel Tower is located in the city of", "Eiffel Tower", kind="mlp")
    >>> res.high > res.low, res.scores.shape
    (True, torch.Size([10, 18]))
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from tracer.attribution import attribution_scores, check_method, is_estimate
from tracer.batching import prefix_batches
from tracer.hooks import EMBED, KINDS, hook_layer, hook_name, hooks, resolve_hook
from tracer.model import final_logits, final_resid, model_device, model_name, prefix_kv_cache, recording, resume_with_prefix, run_until
from tracer.noise import NoiseCache, NoiseScale, resolve_noise
from tracer.patching import noise_hook, subject_noise
from tracer.prompts import PromptTokens, encode, locate_subject, target_ids
from tracer.result import TraceResult

log = logging.getLogger(__name__)

SEVERABLE = ("mlp", "attn")


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """Layers restored for a window of `window` layers centred on `layer`, clipped to the model.

    Example:
        >>> window_layers(0, 10, 18), window_layers(9, 10, 18)
        (range(0, 5), range(4, 14))
    """
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


@dataclass(frozen=True, kw_only=True)
class Runs:
    """The cached clean and corrupted states of one prompt, shared by all restored conditions.

    Attributes:
        prompt: the tokenized prompt and its subject span.
        target_id: the scored token id.
        clean_pre: clean `resid_pre` per layer, plus the last block's output at index
            `n_layers`: `[n_layers + 1, pos, d_model]`.
        clean_sub: clean sublayer outputs by kind ("mlp", "attn"): `[n_layers, pos, d_model]`.
        corrupt_pre: corrupted `resid_pre` (and final output), `[n_layers + 1, samples, pos, d_model]`.
        corrupt_sub: corrupted sublayer outputs by kind, `[n_layers, samples, pos, d_model]`.
        high: clean target probability.
        low: corrupted target probability, averaged over samples.
        first_changed: first token whose clean and corrupted inputs differ; restoring any
            state at an earlier token is a no-op.
        noise_std: noise std in hook_embed units (None with a corrupted prompt).
        corrupt_tokens: the corrupted run's input, `[samples, pos]`.
        embed_delta: the noise added at `hook_embed` to the subject tokens,
            `[samples, subject_len, d_model]` (None with a corrupted prompt).
        corrupt_kv: the corrupted run's keys and values per layer (`prefix_kv_cache`: a 3.x
            cache or a 4.x `BridgeKV`), or None where the model has no usable one.
    """

    prompt: PromptTokens
    target_id: int
    clean_pre: Tensor
    clean_sub: dict
    corrupt_pre: Tensor
    corrupt_sub: dict
    high: float
    low: float
    first_changed: int
    noise_std: float | None
    corrupt_tokens: Tensor
    embed_delta: Tensor | None
    corrupt_kv: object = None


def _target_prob(model, resid: Float[Tensor, "batch d_model"], target_id: int) -> Float[Tensor, " batch"]:
    """Softmax probability of `target_id` from final-block residuals at one position."""
    logits = final_logits(model, resid).float()  # [batch, d_vocab], last position only
    return (logits[:, target_id] - logits.logsumexp(-1)).exp()


#: A trace metric: the last position's logits, `[batch, 1, d_vocab]` (float32, position axis
#: kept so that a TransformerLens-style `logits[:, -1]` works), to one number per row, `[batch]`.
#: With `metric_at=` a hook name, it gets that hook's activation at the last position instead,
#: `[batch, 1, ...]` (e.g. an SAE's latents, `[batch, 1, d_sae]`).
Metric = Callable[[Float[Tensor, "batch 1 ..."]], Float[Tensor, " batch"]]


def _checked(out, rows: int) -> Float[Tensor, " batch"]:
    """A metric's output, refused unless it is one finite number per row."""
    if not torch.is_tensor(out) or tuple(out.shape) != (rows,):
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ValueError(
            f"metric returned {shape}; expected one number per batch row, a tensor of shape "
            f"[{rows}] (e.g. logits[:, -1, a] - logits[:, -1, b], without .mean())"
        )
    bad = ~torch.isfinite(out)
    if bad.any():
        raise ValueError(f"metric returned {int(bad.sum())} non-finite values (NaN or inf) of {rows}: {out[bad][:3].tolist()}")
    return out


def _metric_rows(model, resid: Float[Tensor, "batch d_model"], metric: Metric) -> Float[Tensor, " batch"]:
    """`metric` of the logits unembedded from final-block residuals at the last position."""
    logits = final_logits(model, resid).float()[:, None]  # [batch, 1, d_vocab]
    return _checked(metric(logits), resid.shape[0])


def _metric_at_rows(act: Float[Tensor, "batch pos ..."], metric: Metric) -> Float[Tensor, " batch"]:
    """`metric` of a hook's activation at the last position, `[batch, 1, ...]` (float32)."""
    return _checked(metric(act[:, -1:].float()), act.shape[0])


def check_metric_at(model, metric_at: str, metric: Metric | None) -> int:
    """The block of hook point `metric_at` (see `hook_layer`), after checking it exists.

    Raises:
        ValueError: no `metric`, or `metric_at` is not a hook point of `model`.
    """
    if metric is None:
        raise ValueError(f"metric_at {metric_at!r} needs a metric: a function of that hook's activation")
    points = getattr(model, "hook_dict", {})
    if not isinstance(metric_at, str) or resolve_hook(model, metric_at) not in points:
        near = [k for k in points if isinstance(metric_at, str) and k.startswith(metric_at.rsplit(".", 1)[0])][:5]
        raise ValueError(f"metric_at {metric_at!r} is not a hook point of this model; e.g. {near or list(points)[:5]}")
    if metric_at.endswith(("hook_pattern", "hook_attn_scores")):
        raise ValueError(
            f"metric_at {metric_at!r} is an attention pattern, [batch, head, query, key]: the metric gets axis 1 as "
            "positions; trace a hook whose activation is [batch, pos, ...] (e.g. blocks.l.attn.hook_z)"
        )
    return hook_layer(metric_at, model.cfg.n_layers)


@torch.no_grad()
def metric_bounds(model, runs: Runs, metric: Metric | None = None, metric_at: str | None = None) -> tuple[float, float]:
    """`(high, low)`: the metric on the clean run and its mean over the corrupted samples.

    With `metric=None`, the target probability (`runs.high`, `runs.low`). With `metric_at`,
    the metric of that hook's activation (one clean and one corrupted forward pass, ended there).

    Raises:
        ValueError: a metric that does not return finite `[batch]` values, or a bad `metric_at`.
    """
    if metric is None:
        return runs.high, runs.low
    if metric_at is None:
        high = float(_metric_rows(model, runs.clean_pre[-1, -1:], metric)[0])
        low = float(_metric_rows(model, runs.corrupt_pre[-1, :, -1], metric).double().mean())
        return high, low
    check_metric_at(model, metric_at, metric)
    name = resolve_hook(model, metric_at)
    device = runs.corrupt_pre.device
    high = float(_metric_at_rows(run_until(model, runs.prompt.tensor(device), name), metric)[0])
    noise = [] if runs.embed_delta is None else [(EMBED, noise_hook(runs.prompt.subject, runs.embed_delta))]
    with hooks(model, noise):
        low = float(_metric_at_rows(run_until(model, runs.corrupt_tokens, name), metric).double().mean())
    return high, low


@torch.no_grad()
def _record_run(model, tokens, embed_hook=None, kv=None):
    """Run `tokens` recording resid_pre, mlp_out and attn_out of every layer; return (pre, sub).

    With `kv` (a `prefix_kv_cache`), the run also fills it with every layer's keys and values.
    """
    n = model.cfg.n_layers
    # resid_pre is fed back in at start_at_layer, so an SAE spliced there is read on its input side
    names = {hook_name(kind, l): resolve_hook(model, hook_name(kind, l), side="input" if kind == "resid_pre" else "output")
             for l in range(n) for kind in ("resid_pre", "mlp", "attn")}
    noise = [] if embed_hook is None else [(resolve_hook(model, EMBED), embed_hook)]
    with model.hooks(fwd_hooks=noise), recording(model, list(names.values())) as got:
        last = final_resid(model, tokens) if kv is None else final_resid(model, tokens, past_kv_cache=kv)
    seen = {ours: got[theirs] for ours, theirs in names.items()}
    pre = torch.stack([seen[hook_name("resid_pre", l)] for l in range(n)] + [last])  # [n+1, batch, pos, d]
    sub = {k: torch.stack([seen[hook_name(k, l)] for l in range(n)]) for k in SEVERABLE}  # [n, batch, pos, d]
    return pre, sub


@torch.no_grad()
def prepare_runs(
    model,
    prompt: str,
    subject: str,
    *,
    target: str | int | None = None,
    samples: int = 10,
    noise: float | NoiseScale = 3.0,
    seed: int = 0,
    corrupted_prompt: str | None = None,
    noise_reference: str | os.PathLike | None = None,
    noise_cache: NoiseCache | None = None,
    device: str | torch.device | None = None,
) -> Runs:
    """Run the clean and corrupted passes once and cache their states (paper, section 2.1).

    Args: as `trace_prompt` (`prompt`, `subject`, `target`, `samples`, `noise`, `seed`,
        `corrupted_prompt`, `noise_reference`, `noise_cache`, `device`).

    Returns:
        A `Runs`: every layer's clean `[n_layers + 1, pos, d_model]` and corrupted
        `[n_layers + 1, samples, pos, d_model]` residuals and sublayer outputs, and the clean
        (`high`) and corrupted (`low`) target probabilities.

    Raises:
        ValueError: an empty prompt, `samples` < 1, a subject not found in the prompt, a
            target that is neither text nor a token id in `[0, d_vocab)`, or a
            `corrupted_prompt` of another token length than the prompt.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt {prompt!r} is empty; expected a non-empty string")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples {samples!r} must be an integer >= 1")
    device = torch.device(device) if device is not None else model_device(model)
    pt = locate_subject(model, prompt, subject)
    tokens = pt.tensor(device)  # [1, pos]
    n_pos = tokens.shape[1]
    clean_pre, clean_sub = _record_run(model, tokens)
    clean_pre = clean_pre[:, 0]  # [n+1, pos, d]
    clean_sub = {k: v[:, 0] for k, v in clean_sub.items()}
    clean_logits = final_logits(model, clean_pre[-1, -1:]).float()[0]  # [d_vocab]
    if target is None:
        target_id = int(clean_logits.argmax())
    elif isinstance(target, bool) or not isinstance(target, (str, int)):
        raise ValueError(f"target {target!r} must be None, a string or a token id")
    else:
        target_id = target_ids(model, pt.prompt, target)[0]
    high = float(clean_logits.softmax(-1)[target_id])

    if corrupted_prompt is not None:
        ct = torch.tensor([encode(model, corrupted_prompt)], dtype=torch.long, device=device)
        if ct.shape[1] != n_pos:
            raise ValueError(
                f"corrupted_prompt {corrupted_prompt!r} has {ct.shape[1]} tokens; expected the "
                f"same length as prompt {pt.prompt!r} ({n_pos} tokens)"
            )
        diff = (ct[0] != tokens[0]).nonzero()
        first_changed = int(diff[0]) if len(diff) else n_pos
        kv = prefix_kv_cache(model, 1)
        corrupt_pre, corrupt_sub = _record_run(model, ct, kv=kv)
        noise_std, delta, corrupt_tokens = None, None, ct
    else:
        noise_std = resolve_noise(model, noise, reference=noise_reference, cache=noise_cache)
        a, b = pt.subject
        delta = subject_noise(noise_std, samples, b - a, model.cfg.d_model, seed)  # [samples, subj, d]
        corrupt_tokens = tokens.expand(samples, -1)
        kv = prefix_kv_cache(model, samples)
        corrupt_pre, corrupt_sub = _record_run(model, corrupt_tokens, embed_hook=noise_hook((a, b), delta), kv=kv)
        first_changed = a if noise_std > 0 else n_pos
    low = float(_target_prob(model, corrupt_pre[-1, :, -1], target_id).mean())
    return Runs(
        prompt=pt,
        target_id=target_id,
        clean_pre=clean_pre,
        clean_sub=clean_sub,
        corrupt_pre=corrupt_pre,
        corrupt_sub=corrupt_sub,
        high=high,
        low=low,
        first_changed=first_changed,
        noise_std=noise_std,
        corrupt_tokens=corrupt_tokens,
        embed_delta=delta,
        corrupt_kv=kv,
    )


@dataclass(frozen=True, kw_only=True)
class _Cond:
    """Rows of restored runs sharing one start layer: token, (pos, layer) cell, window end."""

    start: int
    tok: Tensor  # [m] token restored
    cell: Tensor  # [m] flat index into scores[pos, layer]
    stop: Tensor  # [m] first layer no longer restored (mlp/attn windows)


def _conditions(kind: str, n_pos: int, n_layers: int, first: int, window: int, tokens=None) -> list[_Cond]:
    groups: dict[int, list[tuple[int, int, int]]] = {}
    todo = range(first, n_pos) if tokens is None else sorted({t for t in tokens if t >= first})
    for t in todo:
        for l in range(n_layers):
            if kind == "resid":
                start, stop = l + 1, l + 1
            else:
                w = window_layers(l, window, n_layers)
                start, stop = w.start, w.stop
            groups.setdefault(start, []).append((t, t * n_layers + l, stop))
    out = []
    for start, rows in sorted(groups.items()):
        tok, cell, stop = (torch.tensor(c) for c in zip(*rows))
        out.append(_Cond(start=start, tok=tok, cell=cell, stop=stop))
    return out


@torch.no_grad()
def restore_scores(
    model,
    runs: Runs,
    *,
    kind: str = "resid",
    window: int = 10,
    severed: str | None = None,
    batch_size: int = 128,
    tokens=None,
    metric: Metric | None = None,
    metric_at: str | None = None,
) -> Float[Tensor, "pos layer"]:
    """Scores of every (token, layer) restoration, batched and resumed from cached states.

    Args:
        model: the model `runs` came from.
        runs: from `prepare_runs`.
        kind: "resid", "mlp" or "attn".
        window: layers per mlp/attn window.
        severed: None, or "mlp"/"attn" to freeze that sublayer at later layers (resid only).
        batch_size: most restored runs (rows) per forward pass.
        tokens: token positions to trace (None: all); rows of other tokens are NaN.
        metric: None for the target probability, else a `Metric` (see `trace_prompt`).
        metric_at: None, or the hook point whose activation `metric` reads (see `trace_prompt`).

    Returns:
        `[pos, layer]` target probabilities (or metric values) averaged over noise samples.

    Raises:
        ValueError: an unknown `kind`, `window` or `batch_size` < 1, a `severed` kind other
            than "mlp"/"attn" or with a kind other than "resid", `tokens` outside the prompt,
            a metric that does not return finite `[batch]` values, or a bad `metric_at`.
    """
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is unknown; expected one of {KINDS}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window {window!r} must be an integer >= 1")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size {batch_size!r} must be an integer >= 1")
    if severed is not None and severed not in SEVERABLE:
        raise ValueError(f"severed {severed!r} must be None or one of {SEVERABLE}")
    if severed is not None and kind != "resid":
        raise ValueError(f"severed {severed!r} needs kind 'resid', got kind {kind!r}")
    n = model.cfg.n_layers
    samples, n_pos = runs.corrupt_pre.shape[1], runs.corrupt_pre.shape[2]
    device = runs.corrupt_pre.device
    sums = torch.zeros(n_pos * n, dtype=torch.float64)
    first = runs.first_changed
    if tokens is not None:
        tokens = [int(t) for t in tokens]
        bad = [t for t in tokens if not 0 <= t < n_pos]
        if bad:
            raise ValueError(f"tokens {bad} are outside the prompt's 0..{n_pos - 1}")
        skip = torch.ones(n_pos, dtype=torch.bool)
        skip[tokens] = False
    high, low = metric_bounds(model, runs, metric, metric_at)  # with metric_at: two forward passes, once
    # with metric_at, each run ends at that hook; restorations in later blocks cannot reach it
    at_layer = n if metric_at is None else check_metric_at(model, metric_at, metric)
    stop_name = hook_name("resid", n - 1) if metric_at is None else resolve_hook(model, metric_at)
    sums.view(n_pos, n)[:first] = low * samples  # restoring an unchanged state is a no-op
    if tokens is not None:
        sums.view(n_pos, n)[skip] = float("nan")
    patch_kind = None if kind == "resid" else kind
    kv = runs.corrupt_kv if metric_at is None else None  # the key/value path ends at the last block
    pending: list[tuple[Tensor, Tensor]] = []  # (final residuals, cells) waiting to be unembedded

    def flush():  # unembed in batches: each call reads the whole [d_model, d_vocab] matrix
        resid = torch.cat([r for r, _ in pending])
        cells = torch.cat([c for _, c in pending])
        pending.clear()
        for b in range(0, len(resid), batch_size):
            chunk = resid[b : b + batch_size]
            p = _target_prob(model, chunk, runs.target_id) if metric is None else _metric_rows(model, chunk, metric)
            p = p.double().cpu()
            sums.index_add_(0, cells[b : b + batch_size], p)

    for cond in _conditions(kind, n_pos, n, first, window, tokens):
        m = len(cond.tok)
        # every condition is repeated for each noise sample: row r -> (condition r // S, sample r % S)
        tok_all = cond.tok.repeat_interleave(samples)
        cell_all = cond.cell.repeat_interleave(samples)
        if cond.start > at_layer:  # every restored state is downstream of the metric's hook
            sums.index_add_(0, cell_all, torch.full((len(cell_all),), low, dtype=torch.float64))
            continue
        stop_all = cond.stop.repeat_interleave(samples)
        smp_all = torch.arange(samples).repeat(m)
        for idx in _chunks(tok_all, batch_size, n_pos=n_pos if kv is not None else None):
            tok = tok_all[idx].to(device)
            smp = smp_all[idx].to(device)
            stop = stop_all[idx].to(device)
            rows = torch.arange(len(tok), device=device)
            # with a key/value cache, run only the positions from the batch's first restored token on
            p0 = int(tok.min()) if kv is not None else 0
            rel = tok - p0
            x = runs.corrupt_pre[cond.start][smp, p0:].clone()  # [B, pos - p0, d_model]
            if kind == "resid":  # restore the block output of layer start-1 at token tok
                x[rows, rel] = runs.clean_pre[cond.start][tok]
            hooks_ = []
            for layer in range(cond.start, n):
                if patch_kind is not None:
                    sel = (stop > layer).nonzero()[:, 0]
                    if len(sel):
                        hooks_.append((hook_name(patch_kind, layer), _patcher(sel, rel[sel], runs.clean_sub[patch_kind][layer][tok[sel]])))
                if severed is not None:
                    frozen = runs.corrupt_sub[severed][layer][smp, tok]  # [B, d_model]
                    hooks_.append((hook_name(severed, layer), _patcher(rows, rel, frozen)))
            if metric_at is not None:  # score the hook's activation directly, nothing to unembed
                with hooks(model, hooks_):
                    act = run_until(model, x, stop_name, start_at_layer=cond.start)
                sums.index_add_(0, cell_all[idx], _metric_at_rows(act, metric).double().cpu())
                continue
            if cond.start < n:
                with hooks(model, hooks_):
                    if p0 > 0:
                        resid = resume_with_prefix(model, x, start_at_layer=cond.start, cache=kv, rows=smp, prefix=p0)
                    else:
                        resid = final_resid(model, x, start_at_layer=cond.start)
                resid = resid[:, -1]  # [B, d_model]
            else:
                resid = x[:, -1]
            pending.append((resid, cell_all[idx]))
            if sum(len(r) for r, _ in pending) >= batch_size:
                flush()
    if pending:
        flush()
    if metric_at is not None and kind == "resid" and at_layer < n and resolve_hook(model, metric_at) == resolve_hook(model, hook_name("resid", at_layer)):
        # the metric reads the very state `resid` restores at its layer: at the last token that is the clean value
        last = n_pos - 1
        if tokens is None or last in tokens:
            sums.view(n_pos, n)[last, at_layer] = high * samples
    return (sums / samples).float().view(n_pos, n)


@torch.no_grad()
def patched_score(
    model,
    runs: Runs,
    states=(),
    *,
    kind: str = "resid",
    frozen=(),
    frozen_kind: str | None = None,
) -> float:
    """Straightforward reference: one full forward pass of the corrupted run with clean states restored.

    This is the paper's `trace_with_patch` (and `trace_with_repatch` with `frozen`): the
    corrupted input from the start, full logits, no caching. `restore_scores` must agree.

    Args:
        model: the model.
        runs: from `prepare_runs`.
        states: `(token, layer)` pairs whose `kind` state is set to its clean value.
        kind: "resid", "mlp" or "attn".
        frozen: `(token, layer)` pairs whose `frozen_kind` sublayer keeps its corrupted value.
        frozen_kind: "mlp" or "attn" when `frozen` is given.

    Returns:
        The target probability averaged over samples.

    Raises:
        ValueError: an unknown `kind`, a layer outside `0..n_layers-1`, or `frozen` without a
            `frozen_kind` of "mlp"/"attn".

    Example:
        >>> runs = prepare_runs(model, "The Eiffel Tower is in", "Eiffel Tower")
        >>> patched_score(model, runs, [(3, 5)])
    """
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is unknown; expected one of {KINDS}")
    n = model.cfg.n_layers
    fwd = []
    if runs.embed_delta is not None:
        fwd.append((EMBED, noise_hook(runs.prompt.subject, runs.embed_delta)))
    groups: dict[tuple[str, int], list[tuple[int, Tensor]]] = {}
    for t, l in states:
        if not (0 <= l < n):
            raise ValueError(f"layer {l} of state {(t, l)} is outside 0..{n - 1}")
        value = runs.clean_pre[l + 1][t] if kind == "resid" else runs.clean_sub[kind][l][t]  # [d_model]
        groups.setdefault((hook_name(kind, l), l), []).append((t, value.expand(runs.corrupt_tokens.shape[0], -1)))
    for t, l in frozen:
        if frozen_kind not in SEVERABLE:
            raise ValueError(f"frozen_kind {frozen_kind!r} must be one of {SEVERABLE} when frozen is given")
        groups.setdefault((hook_name(frozen_kind, l), l), []).append((t, runs.corrupt_sub[frozen_kind][l][:, t]))
    for (name, _), items in groups.items():

        def setter(act, hook, items=items):
            for t, value in items:
                act[:, t] = value.to(act.dtype)
            return act

        fwd.append((name, setter))
    with hooks(model, fwd):
        logits = model(runs.corrupt_tokens)[:, -1].float()  # full [samples, pos, vocab] logits
    return float(logits.softmax(-1)[:, runs.target_id].mean())


def reference_scores(
    model, runs: Runs, *, kind: str = "resid", window: int = 10, severed: str | None = None
) -> Float[Tensor, "pos layer"]:
    """`restore_scores` computed the slow, plain way: one `patched_score` per (token, layer).

    Returns `[pos, layer]` target probabilities; raises what `patched_score` raises.
    """
    n = model.cfg.n_layers
    n_pos = runs.corrupt_tokens.shape[1]
    out = torch.zeros(n_pos, n)
    for t in range(n_pos):
        for l in range(n):
            if kind == "resid":
                frozen = [(t, L) for L in range(l + 1, n)] if severed else ()
                out[t, l] = patched_score(model, runs, [(t, l)], frozen=frozen, frozen_kind=severed)
            else:
                out[t, l] = patched_score(model, runs, [(t, L) for L in window_layers(l, window, n)], kind=kind)
    return out


def _chunks(tok: Tensor, batch_size: int, *, n_pos: int | None = None) -> list[Tensor]:
    """Row indices in batches of at most `batch_size` rows: consecutive rows without
    `n_pos`; with it (the key/value-cache path, where a batch computes positions
    `min(tok)..n_pos-1` only), `tracer.batching.prefix_batches`."""
    if n_pos is None:
        return [torch.arange(b, min(b + batch_size, len(tok))) for b in range(0, len(tok), batch_size)]
    return prefix_batches(tok, batch_size, n_pos)


def _patcher(rows: Tensor, toks: Tensor, values: Tensor):
    """A hook that sets `act[rows[i], toks[i]] = values[i]` in place."""

    def hook(act, hook):
        act[rows, toks] = values.to(act.dtype)
        return act

    return hook


def trace_prompt(
    model,
    prompt: str,
    subject: str,
    *,
    target: str | int | None = None,
    kind: str = "resid",
    window: int = 10,
    samples: int = 10,
    noise: float | NoiseScale = 3.0,
    seed: int = 0,
    severed: str | None = None,
    corrupted_prompt: str | None = None,
    batch_size: int = 128,
    noise_reference: str | os.PathLike | None = None,
    noise_cache: NoiseCache | None = None,
    device: str | torch.device | None = None,
    runs: Runs | None = None,
    metric: Metric | None = None,
    metric_at: str | None = None,
    method: str = "exact",
) -> TraceResult:
    """Causal trace of one prompt: the target probability after restoring each (token, layer).

    Args:
        model: a TransformerLens model (either API) with a tokenizer.
        prompt: the prompt (or a `{}` template filled with `subject`).
        subject: the subject whose token embeddings are corrupted.
        target: None for the clean top-1 token, else the answer text or a token id; the
            score is the probability of its first token.
        kind: "resid", "mlp" or "attn" (see the module docstring).
        window: number of layers restored around each layer for "mlp" and "attn".
        samples: noise samples per condition.
        noise: a multiplier of the measured embedding std (paper: 3.0), or `NoiseScale(value)`
            for an explicit std in hook_embed units.
        seed: seed of the noise; the same seed gives the same noise tensor.
        severed: None, or "mlp"/"attn": restore the residual state with that sublayer frozen
            at its corrupted value at later layers (paper, Figure 3); needs kind "resid".
        corrupted_prompt: instead of noise, run this prompt (same token length) as the
            corrupted run; `samples` is then 1.
        batch_size: most restored runs per forward pass (bounds memory).
        noise_reference: `known_1000.json` path whose subjects set the noise std; None for the
            built-in subject list.
        noise_cache: a `NoiseCache` reused across calls (None: a fresh one, disk cache only).
        device: where the cached states live; None for the model's device.
        runs: states from `prepare_runs` to reuse across kinds (the other arguments that
            shape them are then ignored).
        metric: None (default) for the target probability, or a function of the **last
            position's** logits, `[batch, 1, d_vocab]` float32 (the position axis is kept, so a
            TransformerLens-style metric reading `logits[:, -1]` works unchanged), returning
            one number per row, `[batch]`. Rows mix restored conditions and noise samples,
            so the metric must treat each row on its own. Each score is the metric's mean
            over the noise samples; `high` is the metric on the clean run, `low` its mean
            over the corrupted samples. This is `transformer_lens.patching`'s
            `reduce="mean"` convention (TransformerLens 4.x); TransformerLens 3.9's
            patching wants a scalar: pass it `lambda logits: metric(logits).mean()`.
        metric_at: None (the metric reads logits), or a hook point name, e.g. an SAE latent
            `"blocks.4.hook_resid_post.hook_sae_acts_post"` on a sae-lens
            `HookedSAETransformer`: `metric` then gets that hook's activation at the last
            position, `[batch, 1, ...]` float32, and each restored run ends there. A state
            restored in a block after the hook's block cannot reach it, so its score is
            `low` without a run (exact); likewise a residual state restored at the hook's own
            block (`resid` at layer `l` enters block `l + 1`), except where the hook is that very
            state (`blocks.l.hook_resid_post`, or an SAE's output there), whose cell at the last
            token is then `high`. Attention patterns (`[batch, head, query, key]`) are refused.
        method: "exact" (default): one restored run per cell and sample, the paper's trace.
            "atp": attribution-patching **estimates** of the same scores from one corrupted
            forward and backward pass (all samples in one batch; `tracer.attribution`),
            marked `method="atp"` in the result, its plots and its JSON; not with `severed`
            or `metric_at`. "atp-logp": the same pass expanding `log p(target)` instead,
            mapped back to probabilities (estimates on the exact trace's scale; the
            probability metric only).

    Returns:
        A `TraceResult` with `scores[pos, layer]`, `low`, `high` and metadata (with a
        `metric`, `target`/`target_id` still name the clean top-1 or given target).

    Raises:
        ValueError: bad arguments (see `prepare_runs`), a metric that does not return a
            finite `[batch]` tensor, a `metric_at` that is not a hook point of `model`, an
            unknown `method`, an AtP `method` with `severed` or `metric_at`, or "atp-logp"
            with a `metric`.

    Example:
        >>> res = trace_prompt(model, "The Eiffel Tower is located in the city of", "Eiffel Tower")
        >>> fig = res.plot()
        >>> paris, rome = target_ids(model, res.prompt, "Paris")[0], target_ids(model, res.prompt, "Rome")[0]
        >>> diff = trace_prompt(model, res.prompt, "Eiffel Tower",
        ...                     metric=lambda logits: logits[:, -1, paris] - logits[:, -1, rome])
        >>> diff.high, diff.low            # logit(Paris) - logit(Rome), clean and corrupted
    """
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is unknown; expected one of {KINDS}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window {window!r} must be an integer >= 1")
    check_method(method)
    if is_estimate(method) and (severed is not None or metric_at is not None):
        raise ValueError(f"method {method!r} estimates plain restorations only; got severed={severed!r}, metric_at={metric_at!r}")
    if corrupted_prompt is not None:
        samples = 1
    if metric_at is not None:
        check_metric_at(model, metric_at, metric)
    if runs is None:
        runs = prepare_runs(
            model,
            prompt,
            subject,
            target=target,
            samples=samples,
            noise=noise,
            seed=seed,
            corrupted_prompt=corrupted_prompt,
            noise_reference=noise_reference,
            noise_cache=noise_cache,
            device=device,
        )
    if is_estimate(method):
        scores = attribution_scores(model, runs, kinds=(kind,), window=window, metric=metric, method=method)[kind]
    else:
        scores = restore_scores(
            model, runs, kind=kind, window=window, severed=severed, batch_size=batch_size, metric=metric, metric_at=metric_at
        )
    return _result(model, runs, scores, kind=kind, window=window, severed=severed, corrupted_prompt=corrupted_prompt,
                   bounds=metric_bounds(model, runs, metric, metric_at), method=method)


def _result(model, runs: Runs, scores, *, kind, window, severed, corrupted_prompt, bounds, method) -> TraceResult:
    high, low = bounds
    return TraceResult(
        scores=scores,
        low=low,
        high=high,
        prompt=runs.prompt.prompt,
        tokens=runs.prompt.tokens,
        subject=runs.prompt.subject,
        target=model.tokenizer.decode([runs.target_id]),
        target_id=runs.target_id,
        kind=kind,
        window=window,
        samples=int(runs.corrupt_pre.shape[1]),
        noise_std=runs.noise_std,
        severed=severed,
        corrupted_prompt=corrupted_prompt,
        model_name=model_name(model),
        method=method,
    )


def trace_all(model, prompt: str, subject: str, **kwargs) -> dict[str, TraceResult]:
    """`trace_prompt` for "resid", "mlp" and "attn", sharing the clean and corrupted runs.

    Takes `trace_prompt`'s keyword arguments (except `kind` and `runs`) and raises what it
    raises. Returns `{kind: TraceResult}`. With `method="atp"` or `"atp-logp"`, one backward
    pass estimates all three kinds.

    Example:
        >>> results = trace_all(model, "The Eiffel Tower is located in the city of", "Eiffel Tower")
        >>> fig = plot_traces(list(results.values()))
    """
    shaping = {k: kwargs.pop(k) for k in list(kwargs) if k in _RUN_ARGS}
    if kwargs.get("corrupted_prompt") is not None:
        shaping["corrupted_prompt"] = kwargs["corrupted_prompt"]
        shaping["samples"] = 1
    runs = prepare_runs(model, prompt, subject, **shaping)
    method = kwargs.get("method")
    if is_estimate(method) and kwargs.get("severed") is None and kwargs.get("metric_at") is None:
        # one backward pass estimates all three kinds; a misspelt option is refused as trace_prompt refuses it
        inspect.signature(trace_prompt).bind(model, prompt, subject, **kwargs)
        window, metric = kwargs.get("window", 10), kwargs.get("metric")
        est = attribution_scores(model, runs, kinds=KINDS, window=window, metric=metric, method=method)
        bounds = metric_bounds(model, runs, metric)
        return {k: _result(model, runs, est[k], kind=k, window=window, severed=None, bounds=bounds, method=method,
                           corrupted_prompt=kwargs.get("corrupted_prompt")) for k in KINDS}
    return {k: trace_prompt(model, prompt, subject, kind=k, runs=runs, **kwargs) for k in KINDS}


_RUN_ARGS = ("target", "samples", "noise", "seed", "noise_reference", "noise_cache", "device")
