"""Code that more than one editing method uses: padding, probes, templates, hashes, undo.

- `pad_tokens`: right-pad token sequences into one `[n, width]` batch.
- `probe`: the probabilities of the new (and true) targets on each bare edit prompt; the
  `before` / `after` entries of an edit's diagnostics.
- `templates_for`: the bare `"{}"` plus the self-generated context templates.
- `base_hash`: the weights hash of the model before any romelens edit now applied (what
  cached statistics and templates describe).
- `restoring_weights`: a context manager for editors that write into `W_out` while they
  compute (ROME's sequential requests, MEMIT's layer by layer updates): every weight it
  covers is copied back on exit, exceptions included.
- `one_request`, `apply_and_probe`: the shared bodies of every method's `edit` / `edit_many`
  conveniences.

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
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
from torch import Tensor

from editor.context import context_templates
from editor.requests import EditRequest, as_requests
from editor.result import edit_stack
from tracer.model import w_out, weights_hash
from tracer.prompts import target_probs

if TYPE_CHECKING:  # pragma: no cover
    from editor.edit import Edit
    from editor.result import AppliedEdit

log = logging.getLogger(__name__)


def pad_tokens(model, seqs: Sequence[Sequence[int]], device) -> Tensor:
    """Right-pad token id sequences into one `[n, max_len]` long tensor on `device`.

    Padding uses the tokenizer's pad id (0 without one) and sits after each sequence, so a
    causal model's activations at the real positions do not depend on the padding.

    Raises:
        ValueError: `seqs` is empty.

    Example:
        >>> pad_tokens(model, [[1, 2, 3], [4]], "cpu")     # [[1, 2, 3], [4, pad, pad]]
    """
    if len(seqs) == 0:
        raise ValueError("seqs is empty; expected at least one token sequence")
    pad = model.tokenizer.pad_token_id or 0
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(list(s), dtype=torch.long, device=device)
    return tokens


def probe(model, requests: Sequence[EditRequest]) -> dict[str, Tensor]:
    """Probabilities of the new and true targets on each bare edit prompt.

    Returns:
        `{"new_first", "new_seq"}` (first-token and whole-target probability, `[n]` each),
        plus `{"true_first", "true_seq"}` when every request has a `target_true`.
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
    """`"{}"` plus the self-generated templates for each `(length, n)` pair (`editor.context`)."""
    out = ["{}"]
    for i, (length, n) in enumerate(lengths):
        out += context_templates(model, n=n, length=length, seed=i, cache_dir=cache_dir, model_hash=model_hash)[1:]
    return out


def base_hash(model) -> str:
    """Weights hash of the model before any romelens edit now applied (stats describe it)."""
    stack = edit_stack(model)
    return stack[0].model_hash if stack else weights_hash(model)


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
    """
    applied = edit._write(model, edit.model_hash)
    try:
        applied.diagnostics["after"] = probe(model, edit.requests)
    except BaseException:
        applied.restore()
        raise
    return applied
