"""romelens editor: ROME, MEMIT and FT-L edits with exact undo, on any TransformerLens model.

`METHODS` maps a method name to its module-like entry (`edit`, `edit_many`, `HParams`,
`hparams_for`). Every method shares the signature
`edit_many(model, requests, hparams=None, **kw) -> EditResult` (and `edit` for one request).

Example:
    >>> from editor import METHODS, EditRequest
    >>> req = EditRequest(prompt="{} is located in the city of", subject="Eiffel Tower", target_new="Rome")
    >>> with METHODS["rome"].edit(model, req) as e:
    ...     pass                                   # model edited here, restored after
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from editor import ft, memit, rome
from editor.hparams import FTHParams, MEMITHParams, ROMEHParams, ft_hparams, memit_hparams, rome_hparams
from editor.requests import EditRequest, EditRequestError, as_requests
from editor.result import EditOrderError, EditResult, LayerDelta, apply_saved, edit_stack
from editor.stats import layer_stats


@dataclass(frozen=True)
class Method:
    """One editing method in the registry.

    Attributes:
        name: registry key.
        edit: `edit(model, request, hparams=None, **kw) -> EditResult`.
        edit_many: `edit_many(model, requests, hparams=None, **kw) -> EditResult`.
        HParams: its hyperparameter dataclass.
        hparams_for: preset lookup, `hparams_for(model_or_name) -> HParams`.
    """

    name: str
    edit: Callable
    edit_many: Callable
    HParams: type
    hparams_for: Callable


METHODS: dict[str, Method] = {
    "rome": Method("rome", rome.edit, rome.edit_many, ROMEHParams, rome_hparams),
    "memit": Method("memit", memit.edit, memit.edit_many, MEMITHParams, memit_hparams),
    "ft-l": Method("ft-l", ft.edit, ft.edit_many, FTHParams, ft_hparams),
}

__all__ = [
    "METHODS",
    "EditOrderError",
    "EditRequest",
    "EditRequestError",
    "EditResult",
    "FTHParams",
    "LayerDelta",
    "MEMITHParams",
    "Method",
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
