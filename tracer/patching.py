"""Causal tracing's corruption and restoration as plain TransformerLens hooks.

`trace_prompt` runs its clean, corrupted and restored passes internally, with caching. The
same two interventions are available here as `fwd_hooks` lists, so that any TransformerLens
analysis (`model.hooks(...)`, `run_with_hooks`, `transformer_lens.patching`) can run on the
paper's corrupted input:

- `corruption_hooks`: Gaussian noise on the subject's token embeddings at `hook_embed`,
  the same noise tensor `trace_prompt` uses for the same `noise`, `samples` and `seed`
  (both draw it with `subject_noise` and add it with `noise_hook`);
- `restoration_hooks`: clean values from a TransformerLens `ActivationCache` written back at
  given positions and layers (`"resid"` -> `blocks.l.hook_resid_post`, `"mlp"` ->
  `blocks.l.hook_mlp_out`, `"attn"` -> `blocks.l.hook_attn_out`).

**Batch layout.** The paper repeats the prompt once per noise sample. The corrupted batch
is therefore the prompt repeated: pass `tokens.expand(samples, -1)` (or `tokens.repeat(k *
samples, 1)` for `k` copies); row `r` gets noise sample `r % samples`. A batch that is not a
multiple of `samples` (e.g. batch 1 with `samples=10`) raises `ValueError`: a hook cannot
change the batch size, so there is no broadcasting from one row. With `samples=1` any batch
works and every row gets the same noise.

Example:
    >>> from tracer import load_model, locate_subject
    >>> from tracer.patching import corruption_hooks, restoration_hooks
    >>> model = load_model("gemma-3-270m")
    >>> p = locate_subject(model, "The Eiffel Tower is located in the city of", "Eiffel Tower")
    >>> tokens = p.tensor()                                   # [1, pos]
    >>> _, clean = model.run_with_cache(tokens)
    >>> hooks = corruption_hooks(model, tokens, p.subject, samples=3, seed=0)
    >>> hooks += restoration_hooks(clean, kind="mlp", positions=[p.last_subject], layers=range(0, 5))
    >>> with model.hooks(fwd_hooks=hooks):
    ...     logits = model(tokens.expand(3, -1))              # [3, pos, d_vocab]

See docs/interop.md for TransformerLens's own `patching` functions on the corrupted input.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Mapping

import torch
from jaxtyping import Float
from torch import Tensor

from tracer.hooks import EMBED, SAE_SIDES, check_kind, hook_name
from tracer.noise import NoiseCache, NoiseScale, resolve_noise

Hook = Callable[[Tensor, object], Tensor]


def subject_noise(std: float, samples: int, subject_len: int, d_model: int, seed: int) -> Float[Tensor, "samples subject d_model"]:
    """The Gaussian noise added to the subject's embeddings: one draw per sample, seeded.

    `std * randn(samples, subject_len, d_model)` from a CPU `torch.Generator` seeded with
    `seed`, so the same arguments give the same tensor on every device (paper, section 2.1:
    `h_i^(0) := h_i^(0) + eps` for each subject token `i`, `eps ~ N(0, nu)`).

    Args:
        std: the noise standard deviation, in `hook_embed` units (`resolve_noise`).
        samples: noise draws.
        subject_len: subject tokens.
        d_model: the model width.
        seed: seed of the CPU generator.

    Returns:
        The noise, `[samples, subject_len, d_model]`, float32 on the CPU.
    """
    gen = torch.Generator().manual_seed(int(seed))
    return std * torch.randn(samples, subject_len, d_model, generator=gen)


def noise_hook(span: tuple[int, int], delta: Float[Tensor, "samples subject d_model"], *, n_pos: int | None = None) -> Hook:
    """A `hook_embed` hook adding `delta` to positions `span[0]:span[1]`; row `r` gets sample `r % samples`.

    Args:
        span: `(start, end)` subject token span, end exclusive.
        delta: from `subject_noise`.
        n_pos: if given, the token length the activation must have.

    Returns:
        A hook `(x: [batch, pos, d_model], hook) -> [batch, pos, d_model]` that returns a
        noised copy of `x`.

    Raises:
        ValueError (when the hook runs): the batch is not a multiple of `samples`, or the
            activation has another number of positions than `n_pos`.
    """
    a, b = span
    samples = delta.shape[0]

    def add_noise(x, hook):  # x: [batch, pos, d_model], batch = k * samples
        if x.shape[0] % samples:
            raise ValueError(
                f"corrupted batch size {x.shape[0]} is not a multiple of samples {samples}; pass the "
                f"prompt repeated, e.g. tokens.expand({samples}, -1) (row r gets noise sample r % samples)"
            )
        if n_pos is not None and x.shape[1] != n_pos:
            raise ValueError(f"hook_embed has {x.shape[1]} positions; the corrupted prompt has {n_pos} tokens")
        x = x.clone()
        d = delta.to(device=x.device, dtype=x.dtype)
        x[:, a:b] += d if x.shape[0] == samples else d.repeat(x.shape[0] // samples, 1, 1)
        return x

    return add_noise


def _n_pos(tokens) -> int:
    if not isinstance(tokens, Tensor) or tokens.ndim not in (1, 2):
        raise ValueError(f"tokens must be a [pos] or [batch, pos] tensor of token ids, got {type(tokens).__name__} {getattr(tokens, 'shape', '')}")
    return int(tokens.shape[-1])


def corruption_hooks(
    model,
    tokens: Tensor,
    subject_span: tuple[int, int],
    *,
    noise: float | NoiseScale = 3.0,
    samples: int = 10,
    seed: int = 0,
    noise_reference: str | os.PathLike | None = None,
    noise_cache: NoiseCache | None = None,
) -> list[tuple[str, Hook]]:
    """`fwd_hooks` that corrupt the subject as `trace_prompt` does: noise on its embeddings.

    The noise std goes through `resolve_noise` (a multiplier of the measured embedding std,
    paper: 3.0, or an explicit `NoiseScale`) and the noise tensor through `subject_noise`, so
    `trace_prompt` with the same `noise`, `samples` and `seed` corrupts identically.

    Args:
        model: a TransformerLens model (either API).
        tokens: the prompt's token ids, `[pos]` or `[batch, pos]`; only its length is used
            (the hook checks the corrupted run has that many positions).
        subject_span: `(start, end)` of the subject tokens, end exclusive, e.g.
            `locate_subject(model, prompt, subject).subject`.
        noise: multiplier of the measured embedding std, or `NoiseScale(value)`.
        samples: noise samples; the corrupted batch must be a multiple of it (row `r` gets
            sample `r % samples`); see the module docstring.
        seed: seed of the noise.
        noise_reference, noise_cache: as in `trace_prompt`.

    Returns:
        `[("hook_embed", hook)]`, for `model.hooks(fwd_hooks=...)` or `run_with_hooks`.

    Raises:
        ValueError: `tokens` not a `[pos]` or `[batch, pos]` tensor, a bad span, `samples`
            or `noise` (`resolve_noise`); at run time, a batch that is not a multiple of
            `samples` or a prompt of another length.

    Example:
        >>> hooks = corruption_hooks(model, tokens, (2, 4), samples=3)
        >>> with model.hooks(fwd_hooks=hooks):
        ...     logits = model(tokens.expand(3, -1))
    """
    n_pos = _n_pos(tokens)
    try:
        a, b = (int(i) for i in subject_span)
    except (TypeError, ValueError):
        raise ValueError(f"subject_span {subject_span!r} must be a (start, end) pair of token indices") from None
    if not 0 <= a < b <= n_pos:
        raise ValueError(f"subject_span {subject_span!r} must satisfy 0 <= start < end <= {n_pos} (the prompt's length)")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples {samples!r} must be an integer >= 1")
    std = resolve_noise(model, noise, reference=noise_reference, cache=noise_cache)
    delta = subject_noise(std, samples, b - a, model.cfg.d_model, seed)
    return [(EMBED, noise_hook((a, b), delta, n_pos=n_pos))]


def _ints(value, name: str) -> list[int]:
    items = [value] if isinstance(value, int) else list(value) if isinstance(value, Iterable) else None
    if not items or any(isinstance(i, bool) or not isinstance(i, int) for i in items):
        raise ValueError(f"{name} {value!r} must be an int or a non-empty sequence of ints")
    return items


def restoration_hooks(
    clean_cache: Mapping[str, Tensor],
    *,
    kind: str,
    positions: int | Iterable[int],
    layers: int | Iterable[int],
) -> list[tuple[str, Hook]]:
    """`fwd_hooks` that write clean states back at every `(position, layer)` of the product.

    `kind` `"resid"` restores `blocks.l.hook_resid_post` (the paper's hidden state
    `h_i^(l)`), `"mlp"` `blocks.l.hook_mlp_out` and `"attn"` `blocks.l.hook_attn_out`.
    `trace_prompt(kind="resid")`'s cell `(t, l)` is `positions=[t], layers=[l]`; its
    `mlp`/`attn` cell `(t, l)` is `positions=[t], layers=tracer.trace.window_layers(l,
    window, n_layers)`.

    Args:
        clean_cache: the clean run's `ActivationCache` (`_, cache = model.run_with_cache(tokens)`)
            or any mapping from hook name to `[batch, pos, d_model]`; batch 1 is broadcast over
            the corrupted batch, otherwise it must equal it.
        kind: "resid", "mlp" or "attn".
        positions: token position(s) to restore.
        layers: layer(s) to restore at.

    Returns:
        One `(hook_name, hook)` per layer; each hook sets `act[:, positions]` to the clean value.

    Raises:
        ValueError: an unknown kind, a hook name missing from the cache, a cached value that
            is not `[batch, pos, d_model]`, a position outside the cached prompt; at run time,
            a run whose token count (or width) differs from the cached prompt's, or a batch
            the clean cache cannot broadcast to.

    Example:
        >>> _, clean = model.run_with_cache(tokens)
        >>> with model.hooks(fwd_hooks=corruption_hooks(model, tokens, (2, 4), samples=3)
        ...                  + restoration_hooks(clean, kind="resid", positions=3, layers=5)):
        ...     logits = model(tokens.expand(3, -1))
    """
    check_kind(kind)
    pos = _ints(positions, "positions")
    hooks = []
    for layer in _ints(layers, "layers"):
        name = hook_name(kind, layer)
        if name not in clean_cache and f"{name}.{SAE_SIDES['output']}" in clean_cache:
            name = f"{name}.{SAE_SIDES['output']}"  # an SAE spliced in by sae-lens: its output flows on
        try:
            clean = clean_cache[name]  # [batch, pos, d_model]
        except KeyError:
            raise ValueError(
                f"clean_cache has no {name!r} (layer {layer}); pass the cache of a clean "
                "model.run_with_cache(tokens) on the same model"
            ) from None
        if not isinstance(clean, Tensor) or clean.ndim != 3:
            raise ValueError(
                f"clean_cache[{name!r}] has shape {tuple(getattr(clean, 'shape', ()))}; expected [batch, pos, d_model] "
                "(a run_with_cache without remove_batch_dim=True)"
            )
        bad = [p for p in pos if not -clean.shape[1] <= p < clean.shape[1]]
        if bad:
            raise ValueError(f"positions {bad} are outside the cached prompt's 0..{clean.shape[1] - 1}")
        hooks.append((name, _restorer(clean[:, pos], pos, tuple(clean.shape[1:]))))
    return hooks


def _restorer(values: Float[Tensor, "batch k d_model"], pos: list[int], shape: tuple[int, int]) -> Hook:
    def restore(act, hook):  # act: [batch, pos, d_model]
        if tuple(act.shape[1:]) != shape:  # a cache of another prompt (length) or model (width)
            raise ValueError(
                f"clean_cache was recorded on {shape[0]} tokens of width {shape[1]}; the patched run has {act.shape[1]} "
                f"tokens of width {act.shape[2]} at {hook.name}: restore from the clean run of the same tokens and model"
            )
        if values.shape[0] not in (1, act.shape[0]):
            raise ValueError(f"clean_cache has batch {values.shape[0]}; the patched run has batch {act.shape[0]} (expected 1 or equal)")
        if act.requires_grad:  # as transformer_lens.patching: never write into a graph tensor in place
            act = act.clone()
        act[:, pos] = values.to(device=act.device, dtype=act.dtype)
        return act

    return restore
