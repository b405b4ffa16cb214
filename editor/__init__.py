"""romelens editor: ROME, MEMIT and FT-L edits with exact undo, on any TransformerLens model.

Compute first, apply on request. Every method in `METHODS` shares the signatures

- `compute(model, requests, hparams=None, **kw) -> Edit`: the deltas and diagnostics; the
  model's weights are bit-identical afterwards;
- `edit_many(model, requests, hparams=None, **kw) -> AppliedEdit` (and `edit` for one
  request): `compute`, then `Edit.apply`, with `diagnostics["after"]`.

`kw` is `stats=`, `corpus=`, `cache_dir=`, `device=`. A new method is one more `Method`
entry. `EditResult` is the earlier name of `AppliedEdit`.

Example:
    >>> from editor import METHODS, EditRequest
    >>> req = EditRequest(prompt="{} is located in the city of", subject="Eiffel Tower", target_new="Rome")
    >>> e = METHODS["rome"].compute(model, req)      # model unchanged
    >>> with e.applied(model):
    ...     pass                                     # model edited here, restored after
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from editor import alphaedit, ft, memit, rome
from editor.alphaedit import AlphaEditHParams, AlphaEditSequence, alphaedit_hparams
from editor.edit import Edit
from editor.hparams import FTHParams, MEMITHParams, ROMEHParams, ft_hparams, memit_hparams, rome_hparams
from editor.requests import EditRequest, EditRequestError, as_requests
from editor.result import AppliedEdit, EditOrderError, EditResult, LayerDelta, apply_saved, edit_stack
from editor.stats import layer_stats


@dataclass(frozen=True, kw_only=True)
class Method:
    """One editing method in the registry.

    Attributes:
        name: registry key (also `Edit.method`).
        compute: `compute(model, requests, hparams=None, **kw) -> Edit`; the model is unchanged.
        edit: `edit(model, request, hparams=None, **kw) -> AppliedEdit`.
        edit_many: `edit_many(model, requests, hparams=None, **kw) -> AppliedEdit`.
        HParams: its hyperparameter dataclass (`Edit.load` rebuilds saved hparams with it).
        hparams_for: preset lookup, `hparams_for(model_or_name) -> HParams`.
        new_sequence: for a method whose batches depend on the earlier ones of a sequential
            run (AlphaEdit), `new_sequence()` gives the state `compute(..., sequence=state)`
            takes, and `state.record(model, edit)` is called after each batch is applied.
    """

    name: str
    compute: Callable
    edit: Callable
    edit_many: Callable
    HParams: type
    hparams_for: Callable
    new_sequence: Callable | None = None


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(name="rome", compute=rome.compute, edit=rome.edit, edit_many=rome.edit_many, HParams=ROMEHParams,
               hparams_for=rome_hparams),
        Method(name="memit", compute=memit.compute, edit=memit.edit, edit_many=memit.edit_many, HParams=MEMITHParams,
               hparams_for=memit_hparams),
        Method(name="ft-l", compute=ft.compute, edit=ft.edit, edit_many=ft.edit_many, HParams=FTHParams,
               hparams_for=ft_hparams),
        Method(name="alphaedit", compute=alphaedit.compute, edit=alphaedit.edit, edit_many=alphaedit.edit_many,
               HParams=AlphaEditHParams, hparams_for=alphaedit_hparams, new_sequence=alphaedit.new_sequence),
    )
}

__all__ = [
    "METHODS",
    "AlphaEditHParams",
    "AlphaEditSequence",
    "AppliedEdit",
    "Edit",
    "EditOrderError",
    "EditRequest",
    "EditRequestError",
    "EditResult",
    "FTHParams",
    "LayerDelta",
    "MEMITHParams",
    "Method",
    "alphaedit",
    "alphaedit_hparams",
    "ROMEHParams",
    "apply_saved",
    "as_requests",
    "edit_stack",
    "ft",
    "ft_hparams",
    "layer_stats",
    "memit",
    "memit_hparams",
    "rome",
    "rome_hparams",
]
