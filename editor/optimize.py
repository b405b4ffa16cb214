"""Shared machinery of ROME and MEMIT: keys over context templates, and value optimisation.

- `subject_keys`: the key `k` (`blocks.{l}.mlp.hook_post`) at the last subject token of each
  request's prompt under each context template; batched.
- `optimize_values` (and `optimize_with`, which takes its settings from a ROME or MEMIT
  hparams): for each request, the delta `δ` added to the raw MLP output of a
  block (`W_out @ k + b_out`, via `tracer.mlp_output_delta`) at the last subject token that
  makes the model say `target_new` (ROME's `v*`, MEMIT's `z`). Requests in one batch are
  independent (per-request losses are summed and Adam is per-element); a request that has
  converged is frozen and its rows leave the batch, so later steps cost only the others.

Example:
    >>> keys = subject_keys(model, requests, ["{}"], layer=4)   # [n, templates, d_mlp]
"""

from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

from editor.hparams import EARLY_STOP_ON, KL_POSITIONS, one_of
from editor.requests import EditRequest
from tracer.batching import log_probs, pad_tokens, pick, position_log_probs, prefix_batches, teacher_forced
from tracer.hooks import hook_name
from tracer.model import (final_logits, final_resid, mlp_output_delta, model_device, prefix_kv_cache, recording,
                          resume_with_prefix, run_until)
from tracer.prompts import locate_subject, target_ids

log = logging.getLogger(__name__)


def _fill(template: str, prompt: str) -> str:
    """Put a request prompt (with its `{}`) into a context template (with its `{}`)."""
    return template.replace("{}", prompt, 1)


@torch.no_grad()
def subject_keys(
    model, requests: Sequence[EditRequest], templates: Sequence[str], layer: int, *, batch_size: int = 64
) -> Tensor:
    """Keys at the last subject token, `[n_requests, n_templates, d_mlp]`.

    The key `k` is `blocks.{layer}.mlp.hook_post` (what `W_out` reads) at the last subject
    token of each request's prompt put into each context template; averaging over the
    templates gives ROME's `k*` (ROME section 3.1, Step 1) and MEMIT's keys `k_i`.

    Args:
        model: a TransformerLens model with a tokenizer.
        requests: the edit requests.
        templates: context templates, each with one `{}` taking the request's prompt
            (`"{}"` for the bare prompt).
        layer: the edited block.
        batch_size: (request, template) prompts per forward pass.

    Returns:
        `[n_requests, n_templates, d_mlp]` float32 keys on the model's device.

    Raises:
        ValueError: a subject not found in its filled prompt, or a prompt longer than
            `n_ctx` (`locate_subject`).

    Example:
        >>> k_star = subject_keys(model, requests, templates, layer=4).mean(1)   # [n, d_mlp]
    """
    device = model_device(model)
    items = []
    for r in requests:
        for t in templates:
            p = locate_subject(model, _fill(t, r.prompt), r.subject)
            items.append((p.ids, p.last_subject))
    out = []
    for b in range(0, len(items), batch_size):
        chunk = items[b : b + batch_size]
        tokens = pad_tokens(model, [c[0] for c in chunk], device)
        k = run_until(model, tokens, hook_name("key", layer))
        pos = torch.tensor([c[1] for c in chunk], device=device)
        out.append(k[torch.arange(len(chunk), device=device), pos].float())
    return torch.cat(out).reshape(len(requests), len(templates), -1)


@torch.no_grad()
def block_values(model, requests: Sequence[EditRequest], layer: int, kind: str, *, batch_size: int = 64) -> Tensor:
    """`[n, d_model]` at the last subject token of each bare prompt: the raw MLP output
    (`kind="raw"`) or the residual after the block (`kind="resid"`).

    The raw MLP output is ROME's current value `W_out k + b_out` at the subject; MEMIT
    reads the residual (its `h^L`) to form its target values.

    Args:
        model: a TransformerLens model with a tokenizer.
        requests: the edit requests.
        layer: the block read.
        kind: `"raw"`, or any other value for the residual after the block.
        batch_size: prompts per forward pass.

    Returns:
        `[n_requests, d_model]` float32 on the model's device.

    Raises:
        ValueError: a subject not found in its prompt, or a prompt longer than `n_ctx`
            (`locate_subject`).
    """
    device = model_device(model)
    items = [locate_subject(model, r.prompt, r.subject) for r in requests]
    out = []
    for b in range(0, len(items), batch_size):
        chunk = items[b : b + batch_size]
        tokens = pad_tokens(model, [c.ids for c in chunk], device)
        if kind == "raw":  # the MLP module's output, kept on its way; the pass ends after the block
            seen = {}
            with mlp_output_delta(model, layer, lambda o: seen.setdefault("v", o)):
                run_until(model, tokens, hook_name("resid", layer))
            v = seen["v"]
        else:
            v = run_until(model, tokens, hook_name("resid", layer))
        pos = torch.tensor([c.last_subject for c in chunk], device=device)
        out.append(v[torch.arange(len(chunk), device=device), pos].float())
    return torch.cat(out)


@dataclass
class _Batch:
    tokens: Tensor  # [rows, pos]
    row_req: Tensor  # [rows] request index of each row
    row_pos: Tensor  # [rows] last subject token of each row
    lg_rows: Tensor  # [m] rows of scored positions
    lg_cols: Tensor  # [m] their positions
    tgt: Tensor  # [m_nll] target token ids for the NLL positions (first m_nll of m)
    nll_row: Tensor  # [m_nll] row of each NLL position
    n_nll_rows: int  # rewrite rows come first
    kl_rows: Tensor  # [n_kl_rows] row indices of KL rows
    kl_req: Tensor  # [n_kl_rows]
    mask: Tensor  # [rows, pos] 1 at real tokens, 0 at padding

    def select(self, active: Tensor) -> tuple["_Batch", Tensor, Tensor]:
        """The rows of the requests in `active` (`[n]` bool), request indices unchanged.

        Returns `(batch, rows, kl_keep)`: the smaller batch, the kept rows `[rows']` (to
        select the cached residual) and the kept KL rows `[n_kl_rows]` bool (for the
        unedited KL log-probs). Rows never interact in a forward pass, so a request's
        scores are the same in either batch.
        """
        keep = active[self.row_req]  # [rows]
        new_index = torch.cumsum(keep, 0) - 1  # old row -> new row
        lg_keep = keep[self.lg_rows]  # [m]
        nll_keep = lg_keep[: len(self.tgt)]
        kl_keep = keep[self.kl_rows]
        rows = keep.nonzero().squeeze(1)
        sub = _Batch(
            tokens=self.tokens[rows],
            row_req=self.row_req[rows],
            row_pos=self.row_pos[rows],
            lg_rows=new_index[self.lg_rows[lg_keep]],
            lg_cols=self.lg_cols[lg_keep],
            tgt=self.tgt[nll_keep],
            nll_row=new_index[self.nll_row[nll_keep]],
            n_nll_rows=int(keep[: self.n_nll_rows].sum()),
            kl_rows=new_index[self.kl_rows[kl_keep]],
            kl_req=self.kl_req[kl_keep],
            mask=self.mask[rows],
        )
        return sub, rows, kl_keep


def _build(model, requests, templates, kl_prompts, device, kl_position: str = "last") -> _Batch:
    pairs, row_req, row_pos = [], [], []
    for i, r in enumerate(requests):
        tids = target_ids(model, r.filled, r.target_new)
        for t in templates:
            p = locate_subject(model, _fill(t, r.prompt), r.subject)
            pairs.append((p.ids, tids))
            row_req.append(i)
            row_pos.append(p.last_subject)
    nll = teacher_forced(pairs, feed_last=False)  # one row per (request, template)
    seqs = [list(s) for s in nll.seqs]
    lg_rows, lg_cols, tgt, nll_row = list(nll.rows), list(nll.cols), list(nll.targets), list(nll.rows)
    n_nll_rows = len(seqs)
    kl_rows, kl_req = [], []
    for i, r in enumerate(requests):
        for kp in kl_prompts:
            p = locate_subject(model, kp, r.subject)
            row = len(seqs)
            seqs.append(list(p.ids))
            row_req.append(i)
            row_pos.append(p.last_subject)
            kl_rows.append(row)
            kl_req.append(i)
            lg_rows.append(row)
            lg_cols.append(p.last_subject if kl_position == "subject" else len(p.ids) - 1)
    t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    width = max(len(q) for q in seqs)
    return _Batch(
        tokens=pad_tokens(model, seqs, device),
        mask=torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in seqs], dtype=torch.long, device=device),
        row_req=t(row_req),
        row_pos=t(row_pos),
        lg_rows=t(lg_rows),
        lg_cols=t(lg_cols),
        tgt=t(tgt),
        nll_row=t(nll_row),
        n_nll_rows=n_nll_rows,
        kl_rows=t(kl_rows),
        kl_req=t(kl_req),
    )


@contextmanager
def shifted_mlp_outputs(model, layers: Sequence[int], idx: tuple[Tensor, Tensor], delta: Tensor) -> Iterator[None]:
    """Add `delta[:, j]` to block `layers[j]`'s raw MLP output at positions `idx = (rows, pos)`.

    Inside, forward passes see every block's output shifted as a weight edit that maps the
    subject's key to `value + delta` would shift it (ROME's `v*`, MEMIT's `z`); hooks are
    removed on exit.

    Args:
        model: a TransformerLens model.
        layers: the blocks shifted.
        idx: `(rows, pos)`, each `[m]` long, the batch positions shifted.
        delta: `[m, len(layers), d_model]`, in residual-stream units; gradients flow to it.

    Example:
        >>> with shifted_mlp_outputs(model, [4], (rows, pos), delta[:, None]):
        ...     lp = position_log_probs(model, tokens, tf.rows_tensor(), tf.cols_tensor())
    """
    def shift(j):
        return lambda out: out.index_put(idx, delta[:, j].to(out.dtype), accumulate=True)

    with ExitStack() as stack:
        for j, l in enumerate(layers):
            stack.enter_context(mlp_output_delta(model, l, shift(j)))
        yield


@dataclass
class _Prefix:
    """The unedited run's keys and values, for resuming rows after their subject."""

    kv: object  # `tracer.model.prefix_kv_cache`, filled for every row of the full batch
    rows: Tensor  # [rows] each row of the current batch's row in the full batch


def _logits(model, batch: _Batch, layers: Sequence[int], delta: Tensor, x0: Tensor,
            prefix: _Prefix | None = None) -> Tensor:
    """Log-probs `[m, d_vocab]` at the scored positions with `delta[req, j]` added at each
    row's subject token to the raw MLP output of block `layers[j]`.

    `x0`: the residual entering block `layers[0]`; the pass starts there, since the deltas
    change nothing upstream. With `prefix`, positions before a row's last subject token
    are not run either: they never see a delta, so their keys and values are the unedited
    run's; rows are batched by that token (`tracer.batching.prefix_batches`) and each batch
    resumes from its first one (`tracer.model.resume_with_prefix`), the same shortcut as
    causal tracing's.
    """
    rows_all = torch.arange(len(batch.row_req), device=delta.device)
    if prefix is None:
        idx = (rows_all, batch.row_pos)
        with shifted_mlp_outputs(model, layers, idx, delta[batch.row_req]):  # [rows, n_layers, d_model]
            return position_log_probs(model, x0, batch.lg_rows, batch.lg_cols, start_at_layer=layers[0])
    picked, order = [], []
    local = torch.empty_like(rows_all)
    for rows in prefix_batches(batch.row_pos.cpu(), 1 << 30, x0.shape[1]):
        rows = rows.to(delta.device)
        p0 = int(batch.row_pos[rows].min())
        local[rows] = torch.arange(len(rows), device=delta.device)
        idx = (torch.arange(len(rows), device=delta.device), batch.row_pos[rows] - p0)
        with shifted_mlp_outputs(model, layers, idx, delta[batch.row_req[rows]]):
            if p0 > 0:
                out = resume_with_prefix(model, x0[rows, p0:], start_at_layer=layers[0], cache=prefix.kv,
                                         rows=prefix.rows[rows], prefix=p0)
            else:
                out = final_resid(model, x0[rows], start_at_layer=layers[0])
        sel = torch.isin(batch.lg_rows, rows).nonzero()[:, 0]
        picked.append(out[local[batch.lg_rows[sel]], batch.lg_cols[sel] - p0])  # [m_batch, d_model]
        order.append(sel)
    resid = torch.cat(picked)[torch.argsort(torch.cat(order))]  # back in the scored positions' order
    return log_probs(final_logits(model, resid[:, None])[:, 0])


def optimize_values(
    model,
    requests: Sequence[EditRequest],
    *,
    layer: int | Sequence[int],
    templates: Sequence[str],
    kl_prompts: Sequence[str],
    ref_norm: Tensor,
    steps: int,
    lr: float,
    weight_decay: float,
    clamp_norm_factor: float,
    kl_factor: float,
    early_stop_nll: float,
    kl_position: str = "last",
    early_stop_on: str = "nll",
    use_prefix_cache: bool = True,
) -> tuple[Tensor, list[list[float]]]:
    """Optimise `δ [n, d_model]` on the raw MLP output of `layer` at the last subject token.

    Loss per request (ROME Eq. 4; MEMIT Eq. 16): mean over templates of the per-token NLL
    of `target_new`, plus `kl_factor · KL(new ‖ unedited)` on the `kl_prompts` (read at
    their last token with `kl_position="last"`, at the subject's last token with
    `"subject"`), plus `weight_decay · ‖δ‖ / ‖ref‖²`; after each step
    `‖δ‖ ≤ clamp_norm_factor · ‖ref‖`. A request stops (its delta is frozen) once its NLL
    (`early_stop_on="nll"`) or its total loss (`"loss"`) is below `early_stop_nll`.

    With a sequence of layers, one delta per layer is optimised jointly (`δ [n, n_layers,
    d_model]`, each added to its block's raw MLP output); the weight decay is summed over
    the layers and each layer's delta is clamped against its own reference norm.

    Args:
        model: a TransformerLens model with a tokenizer.
        requests: `[n]` edit requests (prompt, subject, `target_new`).
        layer: the block (an int) or increasing blocks (a sequence) whose output is shifted.
        templates: context templates with one `{}` for the request's prompt.
        kl_prompts: prompts (with `{}` for the subject) whose next-token distribution the
            KL term keeps; empty for none.
        ref_norm: `[n]` norm of the reference vector (the original value) per request;
            `[n, n_layers]` with a sequence of layers.
        steps: the most Adam steps.
        lr: Adam's learning rate.
        weight_decay: factor of `‖δ‖ / ‖ref‖²` in the loss.
        clamp_norm_factor: `‖δ‖` is kept at most this times `‖ref‖`.
        kl_factor: factor of the KL term (0: none).
        early_stop_nll: a request stops once its NLL (or loss) is below this, in nats.
        kl_position: `"last"` or `"subject"`, where the KL prompts are read.
        early_stop_on: `"nll"` or `"loss"`, what `early_stop_nll` is compared with.
        use_prefix_cache: where the model has a key/value cache (TransformerLens 3.x), run
            each step only from each row's last subject token on (the positions before it
            never see a delta); False runs every position (same values within float
            rounding; a test compares the two).

    Returns:
        `(δ, curve)`: `δ` is `[n, d_model]` (an int `layer`) or `[n, n_layers, d_model]`
        float32, detached; `curve[s]` lists each request's mean target NLL (nats) at step `s`.

    Raises:
        ValueError: `kl_position` or `early_stop_on` not one of the allowed values, `layer`
            an empty or non-increasing sequence, or a request whose subject is not found in
            a filled prompt or whose prompt and target exceed `n_ctx` (`locate_subject`,
            `target_ids`).

    Example:
        >>> delta, curve = optimize_values(model, requests, layer=4, templates=["{}"], kl_prompts=["{} is a"],
        ...     ref_norm=ref, steps=20, lr=0.5, weight_decay=0.5, clamp_norm_factor=4.0, kl_factor=0.0625,
        ...     early_stop_nll=0.05)
    """
    device = model_device(model)
    n = len(requests)
    one_of("kl_position", kl_position, KL_POSITIONS)
    one_of("early_stop_on", early_stop_on, EARLY_STOP_ON)
    full = _build(model, requests, templates, kl_prompts, device, kl_position)
    n_t = len(templates)
    n_kl = len(kl_prompts)
    single = isinstance(layer, int)
    layers = (layer,) if single else tuple(layer)
    if list(layers) != sorted(set(layers)) or not layers:
        raise ValueError(f"layers {layers} must be a non-empty increasing sequence")
    ref_norm = ref_norm.to(device).float().reshape(n, len(layers))
    delta = torch.zeros(n, len(layers), model.cfg.d_model, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    with torch.no_grad():
        # every step starts at layers[0] (the deltas change nothing upstream) and, where the
        # model has a key/value cache (TransformerLens 3.x), after each row's subject
        kv = prefix_kv_cache(model, len(full.row_req)) if use_prefix_cache else None
        start = hook_name("resid_pre", layers[0])
        if kv is None:
            x0_full = run_until(model, full.tokens, start)
        else:
            with recording(model, [start]) as seen:
                final_resid(model, full.tokens, past_kv_cache=kv, attention_mask=full.mask)
            x0_full = seen[start]
        prefix = None if kv is None else _Prefix(kv=kv, rows=torch.arange(len(full.row_req), device=device))
        lp0 = _logits(model, full, layers, torch.zeros_like(delta), x0_full, prefix)
        kl_init_full = lp0[len(full.tgt):] if n_kl else None  # [n_kl_rows, vocab]
    curve: list[list[float]] = []
    done = torch.zeros(n, dtype=torch.bool, device=device)
    req_nll_last = torch.zeros(n, device=device)  # a converged request's NLL, repeated in the curve
    batch, x0, kl_init = full, x0_full, kl_init_full
    for step in range(steps):
        opt.zero_grad()
        if bool(done.any()) and len(batch.row_req) > int((~done)[full.row_req].sum()):
            # converged requests are frozen: drop their rows, so each step costs only the rest
            batch, rows, kl_keep = full.select(~done)
            x0 = x0_full[rows]
            kl_init = kl_init_full[kl_keep] if n_kl else None
            prefix = None if kv is None else _Prefix(kv=kv, rows=rows)
        lp = _logits(model, batch, layers, delta, x0, prefix)
        m_nll = len(batch.tgt)
        tok_nll = -pick(lp, batch.tgt)  # [m_nll]: the NLL rows come first
        tok_per_row = torch.bincount(batch.nll_row, minlength=batch.n_nll_rows).float()  # [rows]
        row_nll = torch.zeros(batch.n_nll_rows, device=device).index_add(0, batch.nll_row, tok_nll) / tok_per_row
        req_nll = torch.zeros(n, device=device).index_add(0, batch.row_req[: batch.n_nll_rows], row_nll) / n_t
        req_nll = torch.where(done, req_nll_last, req_nll)  # [n]
        loss = req_nll
        if n_kl and kl_factor:
            new = lp[m_nll:]
            kl = (new.exp() * (new - kl_init)).sum(-1)  # KL(new || unedited), [n_kl_rows]
            req_kl = torch.zeros(n, device=device).index_add(0, batch.kl_req, kl) / n_kl
            loss = loss + kl_factor * req_kl
        loss = loss + weight_decay * (delta.norm(dim=-1) / ref_norm**2).sum(-1)
        curve.append([round(float(x), 5) for x in req_nll.detach().cpu()])
        req_nll_last = req_nll.detach()
        done = done | ((req_nll if early_stop_on == "nll" else loss).detach() < early_stop_nll)
        log.debug("step %d nll %s", step, curve[-1])
        if bool(done.all()) or step == steps - 1:
            break
        loss.sum().backward()
        frozen = delta.detach()[done].clone()  # converged requests keep their delta
        opt.step()
        with torch.no_grad():
            delta[done] = frozen
            cap = clamp_norm_factor * ref_norm  # [n, n_layers]
            norm = delta.norm(dim=-1)
            scale = torch.where(norm > cap, cap / norm.clamp_min(1e-12), torch.ones_like(norm))
            delta.mul_(scale[..., None])
    out = delta.detach()
    return (out[:, 0] if single else out), curve


def optimize_with(model, requests: Sequence[EditRequest], hp, *, layer: int | Sequence[int], templates: Sequence[str],
                  ref_norm: Tensor) -> tuple[Tensor, list[list[float]]]:
    """`optimize_values` with the value-optimisation fields of `hp` (a ROME or MEMIT hparams).

    `hp.v_num_grad_steps`, `v_lr`, `v_weight_decay`, `clamp_norm_factor`, `kl_factor`,
    `kl_prompts` and `early_stop_nll`, and `kl_position` / `early_stop_on` where `hp` has them
    (ROME; else their defaults). The loss is ROME Eq. 4 / MEMIT Eq. 16.

    Args:
        model, requests, layer, templates, ref_norm: as in `optimize_values`.
        hp: a `ROMEHParams` or `MEMITHParams`.

    Returns:
        `(δ, curve)` as `optimize_values`: `[n, d_model]` (or `[n, n_layers, d_model]`) and
        each request's mean target NLL (nats) per step.

    Raises:
        ValueError: as `optimize_values` (a bad `kl_position` / `early_stop_on`, layers not
            increasing, a subject or prompt `locate_subject` / `target_ids` refuse).

    Example:
        >>> delta, curve = optimize_with(model, requests, hp, layer=hp.layer, templates=templates, ref_norm=ref)
    """
    return optimize_values(
        model, requests, layer=layer, templates=templates, ref_norm=ref_norm, kl_prompts=hp.kl_prompts,
        steps=hp.v_num_grad_steps, lr=hp.v_lr, weight_decay=hp.v_weight_decay, clamp_norm_factor=hp.clamp_norm_factor,
        kl_factor=hp.kl_factor, early_stop_nll=hp.early_stop_nll,
        kl_position=getattr(hp, "kl_position", "last"), early_stop_on=getattr(hp, "early_stop_on", "nll"),
    )

