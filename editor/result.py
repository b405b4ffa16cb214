"""Edit results: the deltas an editor computed, exact undo, and saved edits.

Every editor returns an `EditResult`. It holds the weight deltas per layer (as low-rank
factors `W_out[l] += U @ V` with `U: [d_mlp, r]`, `V: [r, d_model]`, or a dense
`[d_mlp, d_model]` matrix), a clone of each edited `W_out` taken before the edit, and
diagnostics. `restore()` copies the clones back, so the weights are bit-for-bit those from
before the edit (nothing is subtracted). Edits on one model form a stack kept on the
model object: they must be restored last-in first-out, and restoring out of order raises
`EditOrderError`.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from editor.requests import EditRequest
from tracer.files import atomic_path
from tracer.model import model_name, w_out, weights_hash

log = logging.getLogger(__name__)

_STACK_ATTR = "_romelens_edit_stack"
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
    """

    u: Tensor | None = None
    v: Tensor | None = None
    dense: Tensor | None = None

    def matrix(self) -> Tensor:
        """The `[d_mlp, d_model]` delta; computed the same way wherever it is applied."""
        if self.dense is not None:
            return self.dense
        return self.u @ self.v

    @property
    def rank(self) -> int | None:
        return None if self.dense is not None else int(self.u.shape[1])


def edit_stack(model) -> list:
    """The edits currently applied to `model`, oldest first (kept on the model object)."""
    stack = model.__dict__.get(_STACK_ATTR)
    if stack is None:
        stack = []
        object.__setattr__(model, _STACK_ATTR, stack)
    return stack


@dataclass(eq=False)
class EditResult:
    """An applied edit: deltas, original weights, diagnostics; restorable and saveable.

    Attributes:
        method: "rome", "memit" or "ft-l" (or "saved:<method>").
        requests: the edit requests.
        layers: the edited blocks.
        deltas: `{layer: LayerDelta}`.
        diagnostics: numbers about the edit: `before` / `after` probabilities of the
            new and true targets on each edit prompt, loss curves, etc.
        model_name: id of the edited model.
        model_hash: weights hash of the model just before this edit.
        hparams: the hyperparameters used, as a dict.
    """

    method: str
    requests: tuple[EditRequest, ...]
    layers: tuple[int, ...]
    deltas: dict[int, LayerDelta]
    diagnostics: dict[str, Any] = field(default_factory=dict)
    model_name: str = ""
    model_hash: str = ""
    hparams: dict[str, Any] = field(default_factory=dict)
    _model: Any = field(default=None, repr=False)
    _originals: dict[int, Tensor] = field(default_factory=dict, repr=False)

    @property
    def applied(self) -> bool:
        return self._model is not None

    def restore(self) -> None:
        """Put back the exact weights from before this edit; must be the latest edit applied."""
        if self._model is None:
            raise EditOrderError(f"{self.method} edit of {self._what()} is not applied (already restored?)")
        stack = edit_stack(self._model)
        if not stack or stack[-1] is not self:
            later = [e._what() for e in stack[stack.index(self) + 1 :]] if self in stack else []
            raise EditOrderError(
                f"cannot restore the {self.method} edit of {self._what()} while later edits are applied "
                f"({later}); restore edits in last-in first-out order"
            )
        with torch.no_grad():
            for layer, orig in self._originals.items():
                w_out(self._model, layer).copy_(orig)
        stack.pop()
        self._model = None
        self._originals = {}
        log.info("restored %s edit of %s", self.method, self._what())

    def _what(self) -> str:
        subj = [r.subject for r in self.requests[:3]]
        more = f" +{len(self.requests) - 3}" if len(self.requests) > 3 else ""
        return f"{subj}{more}"

    def __enter__(self) -> "EditResult":
        return self

    def __exit__(self, *exc) -> None:
        if self.applied:
            self.restore()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the deltas and metadata to a safetensors file (atomically).

        Example:
            >>> e.save("edits/eiffel.safetensors")
        """
        from safetensors.torch import save_file  # noqa: PLC0415

        tensors = {}
        for layer, d in self.deltas.items():
            if d.dense is not None:
                tensors[f"layer{layer}.dense"] = d.dense.detach().float().cpu().contiguous()
            else:
                tensors[f"layer{layer}.u"] = d.u.detach().float().cpu().contiguous()
                tensors[f"layer{layer}.v"] = d.v.detach().float().cpu().contiguous()
        diag = {k: v for k, v in self.diagnostics.items() if k in ("before", "after")}
        meta = {
            "format": SAVE_FORMAT,
            "method": self.method,
            "model_name": self.model_name,
            "weights_hash": self.model_hash,
            "layers": json.dumps(list(self.layers)),
            "requests": json.dumps([r.to_dict() for r in self.requests]),
            "hparams": json.dumps(self.hparams, default=str),
            "diagnostics": json.dumps(_jsonable(diag)),
        }
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path


def _jsonable(x):
    if isinstance(x, Tensor):
        return x.tolist()
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def apply_deltas(
    model,
    deltas: dict[int, LayerDelta],
    *,
    method: str,
    requests,
    diagnostics: dict | None = None,
    hparams: dict | None = None,
    model_hash: str | None = None,
) -> EditResult:
    """Write `deltas` into the model's `W_out`s, keeping clones to restore; push on the edit stack.

    Every delta is checked before any weight changes: its shape must be `W_out`'s and its
    entries finite. The delta is formed in float32 and each `W_out` is rounded once, to
    its own dtype, after the addition (so a bf16 / fp16 model gets the nearest weights to
    `W + ΔW`).

    `diagnostics` gains, per edited layer, `delta_ratio[layer] = ‖ΔW‖ / ‖W_out‖` (Frobenius,
    before the edit) and `delta_rounding[layer] = ‖applied − ΔW‖ / ‖ΔW‖`, the part of the
    delta lost to the weights' precision. A warning is logged for a zero delta (the edit
    changes nothing), a ratio above `MAX_DELTA_RATIO`, and a rounding loss above
    `MAX_ROUNDING_LOSS`.

    Raises:
        ValueError: a delta has the wrong shape or a NaN / inf entry; no weight was changed.
    """
    res = EditResult(
        method=method,
        requests=tuple(requests),
        layers=tuple(sorted(deltas)),
        deltas=deltas,
        diagnostics=diagnostics if diagnostics is not None else {},
        model_name=model_name(model),
        model_hash=model_hash or weights_hash(model),
        hparams=hparams or {},
    )
    what = f"{method} edit of {res._what()}"
    ratios = {}
    with torch.no_grad():
        for layer in res.layers:  # check everything before the first write
            w = w_out(model, layer)
            delta = _delta_on(deltas[layer], w)
            if tuple(delta.shape) != tuple(w.shape):
                raise ValueError(f"{what}: delta shape {tuple(delta.shape)} at layer {layer} is not W_out's {tuple(w.shape)}")
            bad = int((~torch.isfinite(delta)).sum())
            if bad:
                raise ValueError(
                    f"{what}: the delta at layer {layer} has {bad} non-finite entries (NaN or inf); "
                    "no weight was changed. Check the key statistics and hparams"
                )
            ratios[layer] = float(delta.norm() / w.float().norm().clamp_min(1e-30))
        originals, rounding = {}, {}
        for layer in res.layers:
            w = w_out(model, layer)
            originals[layer] = w.detach().clone()
            delta = _delta_on(deltas[layer], w)  # same device -> same bits
            w.copy_((w.float() + delta).to(w.dtype))  # one rounding, to the weights' dtype
            applied = w.float() - originals[layer].float()
            rounding[layer] = float((applied - delta).norm() / delta.norm()) if ratios[layer] > 0 else 0.0
    res._originals = originals
    res._model = model
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


def apply_saved(model, path: str | os.PathLike, *, check_hash: bool = True) -> EditResult:
    """Re-apply an edit written by `EditResult.save`, after checking it is the same model.

    Args:
        model: the model (in the state the edit was made on).
        path: the `.safetensors` file.
        check_hash: refuse a model whose weights hash differs from the saved one.

    Returns:
        An applied `EditResult` that can `.restore()`.

    Example:
        >>> e = apply_saved(model, "edits/eiffel.safetensors")
    """
    from safetensors import safe_open  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path {str(path)!r} is not a file; expected a saved edit (.safetensors)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise ValueError(f"path {str(path)!r} is not a readable saved edit ({err})") from None
    if meta.get("format") != SAVE_FORMAT:
        raise ValueError(f"path {str(path)!r} has format {meta.get('format')!r}, expected {SAVE_FORMAT!r}")
    whash = weights_hash(model)
    if check_hash and meta["weights_hash"] != whash:
        raise ValueError(
            f"saved edit {str(path)!r} was made on {meta['model_name']!r} with weights hash "
            f"{meta['weights_hash'][:12]}..., but this model ({model_name(model)!r}) hashes to {whash[:12]}...; "
            "apply it to the same (unedited) model, or pass check_hash=False"
        )
    layers = json.loads(meta["layers"])
    deltas = {}
    for layer in layers:
        if f"layer{layer}.dense" in tensors:
            deltas[layer] = LayerDelta(dense=tensors[f"layer{layer}.dense"])
        else:
            deltas[layer] = LayerDelta(u=tensors[f"layer{layer}.u"], v=tensors[f"layer{layer}.v"])
    requests = [EditRequest.from_dict(r) for r in json.loads(meta["requests"])]
    return apply_deltas(
        model,
        deltas,
        method=meta["method"],
        requests=requests,
        diagnostics={"saved": json.loads(meta.get("diagnostics", "{}")), "path": str(path)},
        hparams=json.loads(meta.get("hparams", "{}")),
        model_hash=whash,
    )
