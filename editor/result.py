"""Applied edits: deltas written into a model, exact undo, and the saved-edit file format.

An editor first computes an `editor.edit.Edit` (deltas and diagnostics; the model is not
changed). Applying it (`Edit.apply`, or the `edit` / `edit_many` conveniences) goes through
`apply_deltas`, which checks every delta, writes them into `W_out` and returns an
`AppliedEdit` (also called `EditResult`). It holds the weight deltas per layer (low-rank
factors `W_out[l] += U @ V` with `U: [d_mlp, r]`, `V: [r, d_model]`, or a dense
`[d_mlp, d_model]` matrix), a clone of each edited `W_out` taken before the edit, and
diagnostics. `restore()` copies the clones back, so the weights are bit-for-bit those from
before the edit (nothing is subtracted).

**The edit stack.** The edits applied to one model form a stack (`edit_stack(model)`): they
must be restored last-in first-out, and restoring out of order raises `EditOrderError`. The
stacks live in a module-level table keyed by the model object's identity and held through a
weak reference, not on the model itself, so:

- `copy.deepcopy(model)` (or pickling it) copies no stack: the copy holds the edited weights
  but no undo, and restoring an edit touches only the model it was applied to;
- `model.to(device or dtype)` changes the same object in place, so its stack stays; a later
  `restore()` writes each saved original into the moved or cast `W_out`, which gives exactly
  the weights the unedited model would have had after the same `.to(...)` (a cast rounds each
  entry alone, the same way both times);
- a model's entry disappears when the model is garbage-collected. An `AppliedEdit` refers to
  its model weakly too, so holding one does not keep a model alive.

Example:
    >>> with rome.edit(model, request) as e:       # restored on exit, exceptions included
    ...     print(e.diagnostics["after"])
    >>> e = rome.edit(model, request); e.save("eiffel.safetensors"); e.restore()
    >>> e2 = apply_saved(model, "eiffel.safetensors")   # same weights as the edit gave
"""

from __future__ import annotations

import json
import logging
import os
import weakref
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import Tensor

from editor.checks import check_finite, check_layer
from editor.requests import EditRequest
from tracer.files import atomic_path
from tracer.model import model_name, w_out, weights_hash

if TYPE_CHECKING:  # pragma: no cover
    from editor.edit import Edit

log = logging.getLogger(__name__)

SAVE_FORMAT = "romelens-edit-1"

# Above this ‖ΔW‖ / ‖W_out‖ (Frobenius, per layer) `apply_deltas` logs a warning. Normal edits
# stay well below it. Gemma-3-270m, layer 4 (‖W_out‖ = 14.0): ROME preset edits of 40
# CounterFact validation records have ‖ΔW‖ = ‖v‖ 0.5-1.3 (ratio median 0.05, max 0.095);
# FT-L's L∞ bound 5e-4 caps ‖ΔW‖ at 0.57 (ratio <= 0.041). Key statistics from 1,000 tokens
# (singular, now refused) gave 161. MEMIT batches of 100 are not measured yet.
MAX_DELTA_RATIO = 0.5
# Above this fraction of the delta lost to the weights' precision (bf16 / fp16), a warning.
MAX_ROUNDING_LOSS = 0.5


class EditOrderError(ValueError):
    """An edit was restored while a later edit on the same model is still applied."""


@dataclass(frozen=True)
class LayerDelta:
    """The change to one layer's `W_out`: `U @ V` (low rank) or `dense`.

    Attributes:
        u: `[d_mlp, r]` left factor, or None.
        v: `[r, d_model]` right factor, or None.
        dense: `[d_mlp, d_model]` full delta, or None (exactly one of dense / (u, v) is set).

    Raises:
        ValueError: both or neither of `dense` and `(u, v)` given, a factor that is not a 2-D
            tensor, or factors whose inner dimensions differ.
    """

    u: Tensor | None = None
    v: Tensor | None = None
    dense: Tensor | None = None

    def __post_init__(self):
        if self.dense is not None:
            if self.u is not None or self.v is not None:
                raise ValueError("LayerDelta takes either dense or (u, v), not both")
            if not isinstance(self.dense, Tensor) or self.dense.ndim != 2:
                raise ValueError(f"dense {_shape(self.dense)} must be a [d_mlp, d_model] tensor")
            return
        if not isinstance(self.u, Tensor) or not isinstance(self.v, Tensor):
            raise ValueError("LayerDelta needs dense, or both u [d_mlp, r] and v [r, d_model]")
        if self.u.ndim != 2 or self.v.ndim != 2 or self.u.shape[1] != self.v.shape[0]:
            raise ValueError(f"u {_shape(self.u)} and v {_shape(self.v)} must be [d_mlp, r] and [r, d_model]")

    def matrix(self) -> Tensor:
        """The `[d_mlp, d_model]` delta; computed the same way wherever it is applied."""
        if self.dense is not None:
            return self.dense
        return self.u @ self.v

    @property
    def rank(self) -> int | None:
        """`r`, the factors' inner dimension (one per request for ROME), or None for a dense delta."""
        return None if self.dense is not None else int(self.u.shape[1])


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


# id(model) -> (weak reference to the model, its stack of applied edits, oldest first)
_STACKS: dict[int, tuple[weakref.ref, list]] = {}


def edit_stack(model) -> list:
    """The edits currently applied to `model`, oldest first.

    Kept in a table keyed by the model's identity through a weak reference (see the module
    docstring): a deep copy of the model starts with an empty stack, and the entry goes when
    the model is garbage-collected.

    Example:
        >>> e = rome.edit(model, req); edit_stack(model)[-1] is e
        True
    """
    key = id(model)
    entry = _STACKS.get(key)
    if entry is not None and entry[0]() is model:
        return entry[1]
    ref = weakref.ref(model, lambda r, key=key: _forget(key, r))
    stack: list = []
    _STACKS[key] = (ref, stack)
    return stack


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _STACKS.get(key)
    if entry is not None and entry[0] is ref:
        del _STACKS[key]


def _hparams_dict(hp) -> dict[str, Any]:
    if hp is None:
        return {}
    if is_dataclass(hp) and not isinstance(hp, type):
        return asdict(hp)
    return dict(hp)


@dataclass(eq=False)
class AppliedEdit:
    """An edit written into a model: deltas, original weights, diagnostics; restorable and saveable.

    Attributes:
        method: "rome", "memit" or "ft-l".
        requests: the edit requests.
        layers: the edited blocks.
        deltas: `{layer: LayerDelta}`.
        diagnostics: numbers about the edit: the `before` probabilities of the new and true
            targets on each edit prompt, loss curves, etc. (the `Edit`'s), `delta_ratio` and
            `delta_rounding` per layer (from `apply_deltas`), and `after` when applied by an
            `edit` / `edit_many` convenience.
        model_name: id of the edited model.
        model_hash: weights hash of the model just before this edit.
        hparams: the hyperparameters used, as a dict.
        edit: the `editor.edit.Edit` this was applied from, or None (deltas applied directly).

    Raises:
        EditOrderError: from `restore` (and so on leaving a `with` block) when the edit is no
            longer applied or a later edit on the same model still is.
    """

    method: str
    requests: tuple[EditRequest, ...]
    layers: tuple[int, ...]
    deltas: dict[int, LayerDelta]
    diagnostics: dict[str, Any] = field(default_factory=dict)
    model_name: str = ""
    model_hash: str = ""
    hparams: dict[str, Any] = field(default_factory=dict)
    edit: "Edit | None" = field(default=None, repr=False)
    _model_ref: weakref.ref | None = field(default=None, repr=False)
    _originals: dict[int, Tensor] = field(default_factory=dict, repr=False)

    @property
    def model(self):
        """The model this edit is applied to, or None once restored (or garbage-collected)."""
        return self._model_ref() if self._model_ref is not None else None

    @property
    def applied(self) -> bool:
        """Whether the edit is still written into a live model (not restored)."""
        return self.model is not None

    def restore(self) -> None:
        """Put back the exact weights from before this edit; must be the latest edit applied.

        Raises:
            EditOrderError: the edit is not applied (already restored, or its model is gone),
                or a later edit on the same model is still applied.
        """
        model = self.model
        if model is None:
            gone = " (its model no longer exists)" if self._model_ref is not None else " (already restored?)"
            raise EditOrderError(f"{self.method} edit of {self._what()} is not applied{gone}")
        stack = edit_stack(model)
        if not stack or stack[-1] is not self:
            later = [e._what() for e in stack[stack.index(self) + 1 :]] if self in stack else []
            raise EditOrderError(
                f"cannot restore the {self.method} edit of {self._what()} while later edits are applied "
                f"({later}); restore edits in last-in first-out order"
            )
        with torch.no_grad():
            for layer, orig in self._originals.items():
                w_out(model, layer).copy_(orig)  # casts to the weights' device / dtype if the model moved
        stack.pop()
        self._model_ref = None
        self._originals = {}
        log.info("restored %s edit of %s", self.method, self._what())

    def _what(self) -> str:
        return _what(self.requests)

    def __repr__(self) -> str:
        state = "applied" if self.applied else "restored"
        return f"AppliedEdit({self.method!r}, {self._what()}, layers={self.layers}, {state})"

    def __enter__(self) -> "AppliedEdit":
        return self

    def __exit__(self, *exc) -> None:
        if self.applied:
            self.restore()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the deltas and metadata to a safetensors file (atomically); `Edit.load` reads it.

        Args:
            path: the `.safetensors` file to write (format `SAVE_FORMAT`, see `write_edit_file`).

        Returns:
            The path written.

        Example:
            >>> e.save("edits/eiffel.safetensors")
        """
        return write_edit_file(
            path, method=self.method, model_name=self.model_name, model_hash=self.model_hash,
            deltas=self.deltas, requests=self.requests, hparams=self.hparams, diagnostics=self.diagnostics,
        )


EditResult = AppliedEdit  # the name every editor returned before `compute` / `Edit.apply`


def _what(requests) -> str:
    subj = [r.subject for r in requests[:3]]
    more = f" +{len(requests) - 3}" if len(requests) > 3 else ""
    return f"{subj}{more}"


def apply_deltas(
    model,
    deltas: dict[int, LayerDelta],
    *,
    method: str,
    requests,
    diagnostics: dict | None = None,
    hparams: dict | None = None,
    model_hash: str | None = None,
    edit: "Edit | None" = None,
) -> AppliedEdit:
    """Write `deltas` into the model's `W_out`s, keeping clones to restore; push on the edit stack.

    The one place where romelens writes an edit into a model: `Edit.apply` (and so every
    `edit` / `edit_many`) and `apply_saved` come here. `W_out[l] ← W_out[l] + ΔW_l` with
    `ΔW_l = U @ V` (`U [d_mlp, r]`, `V [r, d_model]`) or a dense `[d_mlp, d_model]` delta.

    Every layer is checked before any weight changes: its index must be a block of the
    model, its delta a `LayerDelta` of `W_out`'s shape with finite entries, and the edited
    weights `W + ΔW` must be finite in the weights' dtype (a float16 `W_out` overflows to
    inf above 65504). So a bad layer anywhere leaves every weight untouched, and if a
    write still fails (out of memory), the layers already written are copied back before
    the error propagates. The delta is formed in float32 and each `W_out` is rounded once,
    to its own dtype, after the addition (so a bf16 / fp16 model gets the nearest weights
    to `W + ΔW`).

    `diagnostics` gains, per edited layer, `delta_ratio[layer] = ‖ΔW‖ / ‖W_out‖` (Frobenius,
    before the edit) and `delta_rounding[layer] = ‖applied − ΔW‖ / ‖ΔW‖`, the part of the
    delta lost to the weights' precision. A warning is logged for a zero delta (the edit
    changes nothing), a ratio above `MAX_DELTA_RATIO`, and a rounding loss above
    `MAX_ROUNDING_LOSS`.

    Args:
        model: the TransformerLens model, changed in place.
        deltas: `{layer: LayerDelta}`.
        method, requests, hparams: recorded on the result (`hparams` a dataclass or a dict).
        diagnostics: the result's diagnostics dict (gains the entries above).
        model_hash: the model's weights hash now (computed when not given).
        edit: the `Edit` being applied, recorded as `AppliedEdit.edit`.

    Returns:
        The `AppliedEdit`, on top of `edit_stack(model)`.

    Raises:
        ValueError: `deltas` not a non-empty dict, a layer index out of range
            (`check_layer`), a delta that is not a `LayerDelta`, has the wrong shape or a
            NaN / inf entry, or edited weights that overflow their dtype; no weight was
            changed.

    Example:
        >>> with apply_deltas(model, {4: LayerDelta(u=u[:, None], v=v[None])}, method="rome", requests=[req]):
        ...     logits = model(tokens)     # W_out[4] += outer(u, v) here, restored after
    """
    if not isinstance(deltas, Mapping) or not deltas:
        raise ValueError(f"deltas {type(deltas).__name__} must be a non-empty {{layer: LayerDelta}} dict")
    for layer, d in deltas.items():
        check_layer(layer, "deltas layer", int(model.cfg.n_layers))
        if not isinstance(d, LayerDelta):
            raise ValueError(f"deltas[{layer}] is a {type(d).__name__}, expected a LayerDelta; no weight was changed")
    res = AppliedEdit(
        method=method,
        requests=tuple(requests),
        layers=tuple(sorted(deltas)),
        deltas=deltas,
        diagnostics=diagnostics if diagnostics is not None else {},
        model_name=model_name(model),
        model_hash=model_hash or weights_hash(model),
        hparams=_hparams_dict(hparams),
        edit=edit,
    )
    what = f"{method} edit of {res._what()}"
    ratios = {}
    with torch.no_grad():
        for layer in res.layers:  # check everything before the first write
            w = w_out(model, layer)
            delta = _delta_on(deltas[layer], w)
            if tuple(delta.shape) != tuple(w.shape):
                raise ValueError(f"{what}: delta shape {tuple(delta.shape)} at layer {layer} is not W_out's {tuple(w.shape)}")
            check_finite(delta, f"{what}: the delta at layer {layer}", "no weight was changed. Check the key statistics and hparams")
            bad = int((~torch.isfinite((w.float() + delta).to(w.dtype))).sum())  # what would be written
            if bad:
                raise ValueError(
                    f"{what}: W_out + delta at layer {layer} has {bad} entries that are not finite in "
                    f"{str(w.dtype).replace('torch.', '')} (max |delta| {float(delta.abs().max()):.3g}); no weight "
                    "was changed. Edit a float32 model, or check the key statistics and hparams"
                )
            ratios[layer] = float(delta.norm() / w.float().norm().clamp_min(1e-30))
        originals, rounding = {}, {}
        try:
            for layer in res.layers:
                w = w_out(model, layer)
                originals[layer] = w.detach().clone()
                delta = _delta_on(deltas[layer], w)  # same device -> same bits
                w.copy_((w.float() + delta).to(w.dtype))  # one rounding, to the weights' dtype
                applied = w.float() - originals[layer].float()
                rounding[layer] = float((applied - delta).norm() / delta.norm()) if ratios[layer] > 0 else 0.0
        except BaseException:  # a write failed after the checks (e.g. out of memory): undo what was written
            for layer, orig in originals.items():
                w_out(model, layer).copy_(orig)
            raise
    res._originals = originals
    res._model_ref = weakref.ref(model)
    edit_stack(model).append(res)
    res.diagnostics["delta_ratio"] = ratios
    res.diagnostics["delta_rounding"] = rounding
    for layer in res.layers:
        if ratios[layer] == 0.0:
            log.warning("%s: the delta at layer %d is zero; the edit changes nothing", what, layer)
        elif ratios[layer] > MAX_DELTA_RATIO:
            log.warning(
                "%s: |ΔW| / |W_out| = %.3g at layer %d, above %.3g; the edit may damage unrelated behaviour "
                "(too few statistics tokens? too weak a regulariser?)", what, ratios[layer], layer, MAX_DELTA_RATIO,
            )
        if rounding[layer] > MAX_ROUNDING_LOSS:
            log.warning(
                "%s: %.0f%% of the delta at layer %d was lost rounding to %s weights; edit a float32 model",
                what, 100 * min(rounding[layer], 1.0), layer, str(w_out(model, layer).dtype).replace("torch.", ""),
            )
    return res


def _delta_on(d: LayerDelta, w: Tensor) -> Tensor:
    """The `[d_mlp, d_model]` float32 delta on `w`'s device."""
    on = lambda t: None if t is None else t.to(device=w.device, dtype=torch.float32)  # noqa: E731
    return LayerDelta(u=on(d.u), v=on(d.v), dense=on(d.dense)).matrix()




# --------------------------------------------------------------------------- saved edits


def write_edit_file(
    path: str | os.PathLike,
    *,
    method: str,
    model_name: str,
    model_hash: str,
    deltas: dict[int, LayerDelta],
    requests,
    hparams,
    diagnostics: dict,
) -> Path:
    """Write an edit as safetensors (float32 factors) plus JSON metadata, atomically.

    Format `romelens-edit-1`: tensors `layer{l}.u` / `layer{l}.v` (or `layer{l}.dense`), and
    string metadata `format`, `method`, `model_name`, `weights_hash`, `layers`, `requests`,
    `hparams` and `diagnostics` (the last four JSON; tensors in the diagnostics as lists).

    Args:
        path: the file to write.
        method, model_name, model_hash: recorded as metadata (`model_hash` as `weights_hash`).
        deltas: `{layer: LayerDelta}`; factors `[d_mlp, r]` / `[r, d_model]` or dense
            `[d_mlp, d_model]`, saved as float32 on the CPU.
        requests: the `EditRequest`s.
        hparams: a dataclass or a dict.
        diagnostics: JSON-able apart from tensors (saved as lists).

    Returns:
        The path written.
    """
    from safetensors.torch import save_file  # noqa: PLC0415

    tensors = {}
    for layer, d in deltas.items():
        if d.dense is not None:
            tensors[f"layer{layer}.dense"] = d.dense.detach().float().cpu().contiguous()
        else:
            tensors[f"layer{layer}.u"] = d.u.detach().float().cpu().contiguous()
            tensors[f"layer{layer}.v"] = d.v.detach().float().cpu().contiguous()
    meta = {
        "format": SAVE_FORMAT,
        "method": method,
        "model_name": model_name,
        "weights_hash": model_hash,
        "layers": json.dumps(sorted(deltas)),
        "requests": json.dumps([r.to_dict() for r in requests]),
        "hparams": json.dumps(_hparams_dict(hparams), default=str),
        "diagnostics": json.dumps(_jsonable(diagnostics), default=str),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_edit_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by `write_edit_file` (or by any romelens version with format 1).

    Returns:
        `{"method", "model_name", "model_hash", "deltas", "requests", "hparams" (dict),
        "diagnostics" (dict; `before` / `after` probabilities as float32 tensors)}`.

    Raises:
        ValueError: `path` is not a file, cannot be read as safetensors, or has another format.
    """
    from safetensors import safe_open  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path {str(path)!r} is not a file; expected a saved edit (.safetensors)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001  (any reader error: not a saved edit)
        raise ValueError(f"path {str(path)!r} is not a readable saved edit ({err})") from None
    if meta.get("format") != SAVE_FORMAT:
        raise ValueError(f"path {str(path)!r} has format {meta.get('format')!r}, expected {SAVE_FORMAT!r}")
    try:
        deltas = {}
        for layer in json.loads(meta["layers"]):
            if f"layer{layer}.dense" in tensors:
                deltas[layer] = LayerDelta(dense=tensors[f"layer{layer}.dense"])
            else:
                deltas[layer] = LayerDelta(u=tensors[f"layer{layer}.u"], v=tensors[f"layer{layer}.v"])
        requests = tuple(EditRequest.from_dict(r) for r in json.loads(meta["requests"]))
        diagnostics = json.loads(meta.get("diagnostics", "{}"))
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(f"path {str(path)!r} is a damaged saved edit ({type(err).__name__}: {err})") from None
    for when in ("before", "after"):
        if isinstance(diagnostics.get(when), dict):
            diagnostics[when] = {k: torch.tensor(v, dtype=torch.float32) for k, v in diagnostics[when].items()}
    return {
        "method": meta["method"],
        "model_name": meta.get("model_name", ""),
        "model_hash": meta["weights_hash"],
        "deltas": deltas,
        "requests": requests,
        "hparams": json.loads(meta.get("hparams", "{}")),
        "diagnostics": diagnostics,
    }


def _jsonable(x):
    if isinstance(x, Tensor):
        return x.tolist()
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def apply_saved(model, path: str | os.PathLike, *, check_hash: bool = True) -> AppliedEdit:
    """`Edit.load(path).apply(model, force=not check_hash)`: re-apply a saved edit.

    Args:
        model: the model (in the state the edit was computed on).
        path: the `.safetensors` file (`Edit.save` or `AppliedEdit.save`).
        check_hash: refuse a model whose weights hash differs from the saved one.

    Returns:
        An applied `AppliedEdit` that can `.restore()`.

    Raises:
        ValueError: an unreadable file, or (with `check_hash`) a model with other weights.

    Example:
        >>> e = apply_saved(model, "edits/eiffel.safetensors")
    """
    from editor.edit import Edit  # noqa: PLC0415  (edit.py builds on this module)

    return Edit.load(path).apply(model, force=not check_hash)
