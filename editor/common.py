"""Code that more than one editing method uses: probes, templates, hashes, undo, conveniences.

(Padding and teacher-forced log-probs are `tracer.batching`'s.)

- `probe`: the probabilities of the new (and true) targets on each bare edit prompt; the
  `before` / `after` entries of an edit's diagnostics.
- `templates_for`: the bare `"{}"` plus the self-generated context templates.
- `start_compute`: what every `compute` does before it computes anything (requests
  normalised, the preset by default, the hparams' type and `editor.checks.check_edit`).
- `base_hash`: the weights hash of the model before any romelens edit now applied (what
  cached statistics and templates describe); `edit_hashes` pairs it with the current one.
- `restoring_weights`: a context manager for editors that write into `W_out` while they
  compute (ROME's sequential requests, MEMIT's layer by layer updates): every weight it
  covers is copied back on exit, exceptions included.
- `conveniences`: every method's `edit_many` and `edit` (compute, then apply and probe),
  built from its `compute`; `one_request` and `apply_and_probe` are their bodies.

Nothing here depends on a particular method; `editor.rome`, `editor.memit` and `editor.ft`
import from here, never from each other.

Example:
    >>> from editor.common import probe, restoring_weights
    >>> with restoring_weights(model, [4]):
    ...     w_out(model, 4).add_(1.0)       # undone on exit
    >>> probe(model, [req])["new_first"]    # tensor([p]) for each request
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch
from torch import Tensor

from editor.checks import check_edit
from editor.context import context_templates
from editor.requests import EditRequest, as_requests
from editor.result import edit_stack
from tracer.model import w_out, weights_hash
from tracer.prompts import target_probs

if TYPE_CHECKING:  # pragma: no cover
    from editor.edit import Edit
    from editor.result import AppliedEdit

log = logging.getLogger(__name__)


def probe(model, requests: Sequence[EditRequest]) -> dict[str, Tensor]:
    """Probabilities of the new and true targets on each bare edit prompt.

    Args:
        model: a TransformerLens model with a tokenizer, as it is now (edited or not).
        requests: `[n]` edit requests; each is scored on `request.filled`.

    Returns:
        `{"new_first", "new_seq"}` (first-token and whole-target probability, `[n]` CPU
        tensors in [0, 1]), plus `{"true_first", "true_seq"}` when every request has a
        `target_true`.

    Raises:
        ValueError: a prompt or target `tracer.target_probs` refuses (empty, longer than
            `n_ctx`, out-of-vocabulary ids).

    Example:
        >>> probe(model, [req])["new_first"]      # tensor([p])
    """
    prompts = [r.filled for r in requests]
    new = target_probs(model, prompts, [r.target_new for r in requests])
    out = {"new_first": new.first, "new_seq": new.seq}
    has_true = [r for r in requests if r.target_true]
    if len(has_true) == len(requests):
        true = target_probs(model, prompts, [r.target_true for r in requests])
        out |= {"true_first": true.first, "true_seq": true.seq}
    return out


def templates_for(model, lengths, *, cache_dir, model_hash) -> list[str]:
    """`"{}"` plus the self-generated templates for each `(length, n)` pair (`editor.context`).

    The context templates over which ROME averages `k*` and the value loss (ROME section
    3.1) and MEMIT its keys and values; pair `i` is sampled with seed `i` and cached.

    Args:
        model: a TransformerLens model with a tokenizer.
        lengths: `(length in tokens, number of templates)` pairs, e.g. `((5, 10), (10, 10))`.
        cache_dir: cache root (`"none"` disables caching).
        model_hash: weights hash keying the cache (the unedited model's, `base_hash`).

    Returns:
        `1 + sum(n)` templates, each with one `{}`; the bare `"{}"` first.

    Raises:
        ValueError: a length too long for the model's context `n_ctx`
            (`editor.context.generate_templates`).

    Example:
        >>> templates_for(model, ((10, 4),), cache_dir=None, model_hash=base_hash(model))[:2]
    """
    out = ["{}"]
    for i, (length, n) in enumerate(lengths):
        out += context_templates(model, n=n, length=length, seed=i, cache_dir=cache_dir, model_hash=model_hash)[1:]
    return out


def start_compute(
    model, method: str, requests, hparams, *, preset: Callable, kind: type, stats=None, device=None, cache_dir=None
) -> tuple[list[EditRequest], object]:
    """The start of every method's `compute`: `(requests, hp)`, checked before anything runs.

    `requests` normalised by `as_requests`; `hp` is `hparams`, or `preset(model,
    cache_dir=cache_dir)` when it is None (a model without a preset keeps its layer choice
    under `cache_dir`), and must be a `kind`; then `editor.checks.check_edit(model, method, ...)`.

    Raises:
        ValueError: `hp` is not a `kind`, or a check of `check_edit` fails.

    Example:
        >>> requests, hp = start_compute(model, "memit", requests, None, preset=memit_hparams, kind=MEMITHParams)
    """
    requests = as_requests(requests)
    hp = hparams or preset(model, cache_dir=cache_dir)
    if not isinstance(hp, kind):
        raise ValueError(f"hparams {hp!r} has type {type(hp).__name__}; expected {kind.__name__}")
    check_edit(model, method, requests, hp, stats=stats, device=device)
    return requests, hp


def base_hash(model) -> str:
    """Weights hash of the model before any romelens edit now applied (stats describe it).

    Returns:
        The hex hash recorded by the first edit on the model's edit stack, or
        `tracer.model.weights_hash(model)` when none is applied.
    """
    stack = edit_stack(model)
    return stack[0].model_hash if stack else weights_hash(model)


def edit_hashes(model) -> tuple[str, str]:
    """`(base, now)`: `base_hash(model)`, and the hash of the weights as they are now (the
    same, unhashed again, when no romelens edit is applied): what an `Edit` records."""
    base = base_hash(model)
    return base, (weights_hash(model) if edit_stack(model) else base)


@contextmanager
def restoring_weights(model, layers: Sequence[int]) -> Iterator[None]:
    """Clone `W_out` of `layers` on entry and copy the clones back on exit, exceptions included.

    For editors that must see their own partial updates while computing (the weights are
    bit-identical afterwards: nothing is subtracted).

    Example:
        >>> with restoring_weights(model, [1]):
        ...     w_out(model, 1).add_(delta)   # later steps see the change
    """
    originals = {l: w_out(model, l).detach().clone() for l in dict.fromkeys(layers)}
    try:
        yield
    finally:
        with torch.no_grad():
            for l, orig in originals.items():
                w_out(model, l).copy_(orig)


def one_request(request) -> list[EditRequest]:
    """`[request]` as an `EditRequest`, for the single-request `edit` conveniences.

    Raises:
        ValueError: `request` holds more than one request (use `edit_many`).
    """
    reqs = as_requests(request)
    if len(reqs) != 1:
        raise ValueError(f"request must be one EditRequest, got {len(reqs)}; use edit_many")
    return reqs


def apply_and_probe(edit: "Edit", model) -> "AppliedEdit":
    """`edit.apply(model)`, then `diagnostics["after"] = probe(model, requests)`.

    For an `edit` just computed on `model` by `compute`: its recorded hash is the model's
    (`compute` hashed these weights and left them bit-identical), so it is not hashed again.
    If the probe fails, the edit is restored before the error propagates.

    Args:
        edit: the `Edit` just computed on `model`.
        model: the model it was computed on, its weights unchanged since.

    Returns:
        The `AppliedEdit` (on the model's edit stack), its `diagnostics["after"]` from `probe`.

    Raises:
        ValueError: deltas `editor.result.apply_deltas` refuses (wrong shape, NaN / inf,
            weights that overflow their dtype: nothing written), or a probe that fails
            (`probe`; the edit is restored first).

    Example:
        >>> applied = apply_and_probe(rome.compute(model, req), model)
    """
    applied = edit._write(model, edit.model_hash)
    try:
        applied.diagnostics["after"] = probe(model, edit.requests)
    except BaseException:
        applied.restore()
        raise
    return applied


def conveniences(compute: Callable, method: str) -> tuple[Callable, Callable]:
    """`(edit_many, edit)` for the method whose `compute` is given: compute, then apply.

    `edit_many(model, requests, hparams=None, **kw)` is `compute(...)` then
    `apply_and_probe` (`diagnostics["after"]` holds the probabilities after); `edit(model,
    request, hparams=None, **kw)` is `edit_many` with one request. Every method shares
    these signatures and the keyword set of its `compute`.

    Args:
        compute: the method's `compute(model, requests, hparams=None, **kw) -> Edit`.
        method: the method's module name, for the docstrings (e.g. `"memit"`).

    Example:
        >>> edit_many, edit = conveniences(compute, "memit")     # at the end of editor/memit.py
    """

    home, name = sys.modules[compute.__module__], compute.__name__

    def edit_many(model, requests, hparams=None, **kw) -> "AppliedEdit":
        # looked up when called, so that `edit_many` runs whatever `<method>.compute` is now
        # (a wrapped or patched compute included), as a function written in the module would
        return apply_and_probe(getattr(home, name)(model, requests, hparams, **kw), model)

    def edit(model, request, hparams=None, **kw) -> "AppliedEdit":
        return edit_many(model, one_request(request), hparams, **kw)

    edit_many.__doc__ = f"""`compute(...)`, then apply it; `diagnostics["after"]` holds the probabilities after.

    Takes `compute`'s arguments and raises what it raises.

    Example:
        >>> with {method}.edit_many(model, requests) as e:
        ...     print(e.diagnostics["after"]["new_seq"])
    """
    edit.__doc__ = f"""`edit_many` with one request.

    Raises:
        ValueError: more than one request (use `edit_many`), or as `compute`.

    Example:
        >>> with {method}.edit(model, request) as e:
        ...     print(e.diagnostics["after"]["new_first"])
    """
    for fn in (edit_many, edit):
        fn.__module__ = getattr(compute, "__module__", fn.__module__)
        fn.__qualname__ = fn.__name__
    return edit_many, edit
