"""`Edit`: an edit computed and not yet applied. Compute first, apply on request.

Every method's `compute(model, requests, hparams=None, **kw)` returns an `Edit` and leaves the
model's weights bit-identical (exceptions included). An `Edit` holds the per-layer deltas
(`LayerDelta`: rank-r factors `U [d_mlp, r]`, `V [r, d_model]` kept factored, or a dense
`[d_mlp, d_model]` matrix), the requests, the resolved hyperparameters, the weights hash of
the model it was computed for, and diagnostics (the target probabilities before, and what
the optimisation reached). It changes a model only when asked:

- `edit.apply(model)` writes it (through `editor.result.apply_deltas`) and returns a
  restorable `AppliedEdit`;
- `with edit.applied(model): ...` restores on exit, exceptions included;
- `edit.save(path)` / `Edit.load(path)`: safetensors plus JSON metadata (format
  `romelens-edit-1`, the same files `AppliedEdit.save` writes and `apply_saved` reads).

Applying to a model whose weights hash differs from the recorded one raises, unless
`force=True` (for example to stack two edits that were each computed on the unedited model).

Example:
    >>> from editor import EditRequest, rome
    >>> req = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome")
    >>> e = rome.compute(model, req)            # the model is unchanged
    >>> e.diagnostics["steps"][0]["nll_curve"]  # what the optimisation reached
    >>> with e.applied(model):
    ...     print(target_probs(model, [req.filled], ["Rome"]).first)
    >>> e.save("eiffel.safetensors"); Edit.load("eiffel.safetensors").apply(model).restore()
"""

from __future__ import annotations

import dataclasses
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from editor.requests import EditRequest
from editor.result import AppliedEdit, LayerDelta, _what, apply_deltas, edit_stack, read_edit_file, write_edit_file
from tracer.model import model_name as _model_name
from tracer.model import weights_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, eq=False)
class Edit:
    """A computed edit: deltas, requests, hparams, the model hash and diagnostics; not applied.

    Attributes:
        method: the `editor.METHODS` key ("rome", "memit", "ft-l").
        requests: the edit requests.
        deltas: `{layer: LayerDelta}`, the change to each edited block's `W_out`
            (`[d_mlp, d_model]` as `U @ V` or dense).
        hparams: the resolved hyperparameters (the method's HParams dataclass; a dict when
            loaded from a file whose fields no longer match the class).
        model_name: id of the model it was computed for.
        model_hash: `tracer.weights_hash` of that model when it was computed.
        diagnostics: `before` (probabilities of the new / true targets on each edit prompt,
            `[n]` tensors) and what the method's optimisation reached (ROME: `steps`, one
            dict per request with its NLL curve and norms; MEMIT: `nll_curves` and per-layer
            `layers`; FT-L: `nll_curve` and `grad_norms`), plus the `templates` used.

    Raises:
        ValueError: no deltas, a layer that is not an int, or a delta that is not a `LayerDelta`.
    """

    method: str
    requests: tuple[EditRequest, ...]
    deltas: dict[int, LayerDelta]
    hparams: Any = None
    model_name: str = ""
    model_hash: str
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "requests", tuple(self.requests))
        if not self.deltas:
            raise ValueError("deltas is empty; an Edit changes at least one layer")
        for layer, d in self.deltas.items():
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ValueError(f"deltas key {layer!r} must be a block index >= 0")
            if not isinstance(d, LayerDelta):
                raise ValueError(f"deltas[{layer}] is a {type(d).__name__}, expected a LayerDelta")

    @property
    def layers(self) -> tuple[int, ...]:
        """The edited blocks, increasing."""
        return tuple(sorted(self.deltas))

    def __repr__(self) -> str:
        return (f"Edit({self.method!r}, {_what(self.requests)}, layers={self.layers}, "
                f"model_hash={self.model_hash[:12]!r})")

    def apply(self, model, *, force: bool = False) -> AppliedEdit:
        """Write this edit into `model` (`editor.result.apply_deltas`); returns a restorable `AppliedEdit`.

        `W_out[l] ← W_out[l] + U_l @ V_l` (or `+ dense_l`) for each layer, rounded once to the
        weights' dtype; the original `W_out`s are cloned so `restore()` is exact.

        Args:
            model: the model this edit was computed for.
            force: apply even when the model's weights hash differs from `model_hash`.

        Returns:
            The `AppliedEdit`, on top of `editor.result.edit_stack(model)`.

        Raises:
            ValueError: the weights hash differs (without `force`; the message names both
                hashes), or a layer is not a block of the model, or a delta does not fit the
                model's `W_out` or is not finite (no weight was changed).

        Example:
            >>> a = e.apply(model); ...; a.restore()
        """
        now = weights_hash(model)
        if now != self.model_hash and not force:
            applied = len(edit_stack(model))
            hint = f", with {applied} romelens edit{'s' if applied != 1 else ''} applied" if applied else ""
            raise ValueError(
                f"{self.method} edit of {_what(self.requests)} was computed for {self.model_name!r} with weights hash "
                f"{self.model_hash[:12]}..., but this model ({_model_name(model)!r}{hint}) hashes to {now[:12]}...; "
                "apply it to the weights it was computed for (restore later edits first), or pass force=True to "
                "apply it anyway"
            )
        if now != self.model_hash:
            log.warning("applying %r to a model whose weights hash %s... differs (force=True)", self, now[:12])
        return self._write(model, now)

    def _write(self, model, model_hash: str) -> AppliedEdit:
        """`apply` without the hash check, for a caller that hashed `model` itself (`model_hash`):
        the `edit` / `edit_many` conveniences, right after `compute` hashed the same weights
        (a whole-model hash takes about a second on Gemma-3-270m)."""
        return apply_deltas(
            model, self.deltas, method=self.method, requests=self.requests, diagnostics=dict(self.diagnostics),
            hparams=self.hparams, model_hash=model_hash, edit=self,
        )

    @contextmanager
    def applied(self, model, *, force: bool = False) -> Iterator[AppliedEdit]:
        """`with edit.applied(model) as a:` the edit is in the model inside the block, restored on exit.

        Args:
            model, force: as in `apply`.

        Yields:
            The `AppliedEdit`.

        Raises:
            ValueError: as `apply`.
            EditOrderError: on exit, when an edit applied inside the block is still applied.

        Example:
            >>> with e.applied(model):
            ...     logits = model(tokens)
        """
        a = self.apply(model, force=force)
        try:
            yield a
        finally:
            if a.applied:
                a.restore()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the deltas (float32) and metadata to a safetensors file, atomically.

        Args:
            path: the `.safetensors` file to write (format `romelens-edit-1`).

        Returns:
            The path written.

        Example:
            >>> e.save("edits/eiffel.safetensors")
        """
        return write_edit_file(
            path, method=self.method, model_name=self.model_name, model_hash=self.model_hash, deltas=self.deltas,
            requests=self.requests, hparams=self.hparams, diagnostics=self.diagnostics,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Edit":
        """Read an edit saved by `Edit.save`, `AppliedEdit.save` or an earlier romelens (format 1).

        The hparams come back as the method's dataclass when the saved fields match it
        (else as the saved dict); `before` / `after` probabilities as float32 tensors.

        Returns:
            The `Edit`, not applied.

        Raises:
            ValueError: `path` is not a file, not a saved edit, or damaged.

        Example:
            >>> Edit.load("edits/eiffel.safetensors").apply(model)
        """
        f = read_edit_file(path)
        return cls(method=f["method"], requests=f["requests"], deltas=f["deltas"],
                   hparams=_hparams_object(f["method"], f["hparams"]), model_name=f["model_name"],
                   model_hash=f["model_hash"], diagnostics=f["diagnostics"])


def _hparams_object(method: str, saved: dict):
    """The method's HParams built from a saved dict (lists back to tuples), or the dict itself."""
    import editor  # noqa: PLC0415  (the registry imports every method, which import this module)

    entry = editor.METHODS.get(method)
    if entry is None or not isinstance(saved, dict):
        return saved
    names = {f.name for f in dataclasses.fields(entry.HParams)}
    if set(saved) != names:
        log.info("saved %s hparams have fields %s, not %s's; kept as a dict", method, sorted(saved), entry.HParams.__name__)
        return saved
    try:
        return entry.HParams(**{k: _tuples(v) for k, v in saved.items()})
    except (TypeError, ValueError) as err:
        log.info("saved %s hparams do not build a %s (%s); kept as a dict", method, entry.HParams.__name__, err)
        return saved


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x

