"""Checks every editor runs before it computes or changes anything.

Each check raises a `ValueError` that names the argument, its value and what was expected,
so that a bad input fails at once instead of reaching TransformerLens (a bare `KeyError` on
a hook name) or, worse, writing a useless or harmful delta that reports itself as applied.

- `check_layer` / `check_layers`: layer indices are ints (not bools), `>= 0`, and, given a
  model, `< n_layers`. Used by the hyperparameter dataclasses (no model) and by every edit
  and by `layer_stats` (with the model).
- `check_stats_tokens`: statistics from fewer tokens than `d_mlp` are singular.
- `check_stats`: key statistics have the right shape, are finite and invertible.
- `check_requests`: no two requests ask for different targets after the same prompt.
- `check_reach`: the edited value can reach the position where the target is predicted.
- `check_edit`: all of the above for one method's `edit_many`, plus the `device` argument.

Example:
    >>> from editor.checks import check_edit
    >>> check_edit(model, "rome", requests, hp, stats=None, device=None)   # raises or returns None
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from tracer.hooks import attached_saes, hook_layer
from tracer.model import model_device
from tracer.prompts import locate_subject, target_ids

log = logging.getLogger(__name__)


def check_layer(value: Any, field: str, n_layers: int | None = None) -> int:
    """`value` as a layer index, or a `ValueError` naming `field`.

    Args:
        value: the layer index to check.
        field: its name in messages, e.g. `"layer"` or `"hparams.layers"`.
        n_layers: the model's block count; None checks only the type and sign.

    Returns:
        `int(value)`.

    Raises:
        ValueError: `value` is not an int (bools are refused), is negative (negative indices
            are not supported: hook names are built from the index), or is `>= n_layers`.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{field} {value!r} must be an int block index, not {type(value).__name__}")
    if value < 0:
        hint = f" (the last block is {n_layers - 1})" if n_layers else " (use n_layers - 1 for the last block)"
        raise ValueError(f"{field} {value} must be >= 0; negative layer indices are not supported{hint}")
    if n_layers is not None and value >= n_layers:
        raise ValueError(f"{field} {value} is out of range for a {n_layers}-layer model (expected 0..{n_layers - 1})")
    return int(value)


def check_layers(values: Any, field: str, n_layers: int | None = None) -> tuple[int, ...]:
    """A non-empty sequence of layer indices, each checked by `check_layer`; returned as a tuple.

    Args:
        values: the layer indices.
        field: their name in messages.
        n_layers: the model's block count; None checks only types and signs.

    Returns:
        The indices as a tuple of ints.

    Raises:
        ValueError: `values` is not a sequence (a string or a single number included) or is
            empty, or an entry fails `check_layer`.
    """
    if isinstance(values, (str, bytes, numbers.Number)) or not isinstance(values, Sequence):
        raise ValueError(f"{field} {values!r} must be a sequence of int block indices, e.g. (2, 3, 4)")
    if len(values) == 0:
        raise ValueError(f"{field} {values!r} is empty; expected at least one block index")
    return tuple(check_layer(v, f"{field} {values!r} entry", n_layers) for v in values)


def check_positive_int(value: Any, field: str) -> int:
    """`value` as an int `>= 1`, or a `ValueError` naming `field` (bools are refused).

    Raises:
        ValueError: `value` is not an int (a bool included) or is < 1.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{field} {value!r} must be a positive int")
    return int(value)


def check_real(value: Any, field: str, *, minimum: float | None = None, positive: bool = False) -> float:
    """`value` as a finite float, or a `ValueError` naming `field`.

    Strings (`"0.5"`, `"False"` from a command line), bools, NaN and infinities are refused;
    `positive` asks for `> 0`, `minimum` for `>= minimum`.

    Raises:
        ValueError: `value` is not a finite real number, or breaks `positive` / `minimum`.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{field} {value!r} must be a finite number, not {type(value).__name__}")
    if positive and value <= 0:
        raise ValueError(f"{field} {value!r} must be > 0")
    if minimum is not None and value < minimum:
        raise ValueError(f"{field} {value!r} must be >= {minimum}")
    return float(value)


def check_bool(value: Any, field: str) -> bool:
    """`value` if it is a bool (not the string "False", not 0/1), else a `ValueError` naming `field`.

    Raises:
        ValueError: `value` is not a bool.
    """
    if not isinstance(value, bool):
        raise ValueError(f"{field} {value!r} must be True or False, not {type(value).__name__}")
    return value


def check_prompts(values: Any, field: str) -> tuple[str, ...]:
    """A tuple of prompt templates, each a string with exactly one `{}` for the subject.

    Raises:
        ValueError: `values` is a string or not a sequence, or an entry is not a string with
            exactly one `{}`.
    """
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ValueError(f"{field} {values!r} must be a tuple of strings with one '{{}}' each, e.g. ('{{}} is a',)")
    for v in values:
        if not isinstance(v, str) or v.count("{}") != 1:
            raise ValueError(f"{field} entry {v!r} must be a string with exactly one '{{}}' for the subject")
    return tuple(values)


def check_context_lengths(values: Any, field: str = "context_lengths") -> tuple[tuple[int, int], ...]:
    """`((length, n), ...)`: `n >= 0` generated templates of `length >= 1` tokens each.

    Returns:
        The pairs as a tuple of `(int, int)` tuples.

    Raises:
        ValueError: `values` is not a sequence of pairs, a length is not an int >= 1, or a
            count is not an int >= 0.
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{field} {values!r} must be a tuple of (length, n) pairs, e.g. ((10, 5),)")
    out = []
    for pair in values:
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"{field} entry {pair!r} must be a (length, n) pair, e.g. (10, 5)")
        length = check_positive_int(pair[0], f"{field} length")
        n = pair[1]
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"{field} count {n!r} must be an int >= 0")
        out.append((length, int(n)))
    return tuple(out)


def check_stats_tokens(model, n_tokens: int, field: str = "mom2_n_tokens") -> None:
    """Refuse statistics over fewer tokens than `d_mlp`, before any are computed.

    `C = E[k kᵀ]` over `n` tokens has rank at most `n`, so with `n < d_mlp` it is singular
    and ROME's `C⁻¹ k*` (MEMIT's `(λC + K Kᵀ)⁻¹ K`) blows up along the missing directions.
    On Gemma-3-270m (d_mlp 2,048) 1,000 tokens gave `‖ΔW‖ = 161 ‖W_out‖`, perplexity
    35.7 -> 165.8 and 22 of 40 unrelated facts changed, all without a warning.

    Raises:
        ValueError: `n_tokens < d_mlp`; the message names both and the ways out.
    """
    d = int(model.cfg.d_mlp)
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, numbers.Integral) or n_tokens < d:
        raise ValueError(
            f"{field} {n_tokens!r} is below d_mlp {d}: key statistics C = E[k kᵀ] from fewer tokens than "
            f"d_mlp are singular, and the update that inverts C blows up. Use {field} >= {d} (the papers "
            "use 100,000), or pass stats= computed elsewhere"
        )


def check_stats(model, stats: Tensor | Mapping[int, Tensor], layers: Sequence[int]) -> None:
    """Key statistics passed by the caller: one `[d_mlp, d_mlp]` finite, invertible matrix per edited layer.

    `C = E[k kᵀ]` is symmetric positive semi-definite; ROME solves `C⁻¹ k*` (Eq. 2) and MEMIT
    `(λC + K Kᵀ)⁻¹` (Eq. 14), so `C` must be positive definite. A Cholesky factorisation in
    float64 tells (about 0.4 s at d_mlp 2,048 on a CPU); Gemma-3-270m's statistics from
    10,000 and 100,000 WikiText tokens pass with their smallest eigenvalue ~1e-4 (largest ~20).

    Args:
        model: the model; its `cfg.d_mlp` sets the expected shape.
        stats: a `[d_mlp, d_mlp]` Tensor (one layer) or `{layer: Tensor}`.
        layers: the edited layers.

    Raises:
        ValueError: `stats` is neither (or one Tensor for several layers), a layer is missing, a matrix is not a floating
            `[d_mlp, d_mlp]` tensor, has a NaN / inf entry (it would be written into `W_out`
            and the edit reported as applied), or is singular (not positive definite: an
            all-zero matrix, a neuron never active, fewer tokens than `d_mlp`), which gave a
            linear-algebra error or NaN factors.
    """
    if isinstance(stats, Tensor):
        if len(layers) != 1:
            raise ValueError(f"stats must be {{layer: C}} for the layers {tuple(layers)}, got one Tensor")
        stats = {layers[0]: stats}
    if not isinstance(stats, Mapping):
        raise ValueError(f"stats {type(stats).__name__} must be a Tensor or a {{layer: Tensor}} dict")
    missing = [l for l in layers if l not in stats]
    if missing:
        raise ValueError(f"stats has no entry for layers {missing}")
    d = int(model.cfg.d_mlp)
    for l in layers:
        C = stats[l]
        if not isinstance(C, Tensor) or tuple(C.shape) != (d, d):
            shape = tuple(C.shape) if isinstance(C, Tensor) else type(C).__name__
            raise ValueError(f"stats shape {shape} at layer {l} is not [d_mlp, d_mlp] = [{d}, {d}]")
        if not C.is_floating_point():
            raise ValueError(f"stats for layer {l} has dtype {C.dtype}; expected a floating-point [d_mlp, d_mlp] matrix")
        check_finite(C, f"stats for layer {l}",
                     "key statistics must be finite. Recompute them (e.g. editor.layer_stats on a float32 model)")
        if int(torch.linalg.cholesky_ex(C.detach().double())[1]):
            dead = int((C.diagonal() <= 0).sum())
            why = f"; {dead} of its {d} diagonal entries are <= 0 (neurons never active)" if dead else ""
            raise ValueError(
                f"stats for layer {l} is singular (not positive definite{why}): ROME's C⁻¹k* and MEMIT's "
                "(λC + K Kᵀ)⁻¹ would fail or give NaN weights. Key statistics E[k kᵀ] are singular from fewer "
                f"tokens than d_mlp {d} or repetitive text; recompute them with editor.layer_stats over a longer corpus"
            )


def check_requests(model, requests: Sequence) -> None:
    """No two requests may ask for different targets after the same (filled) prompt.

    The same text can continue with only one next token, so such a pair cannot both hold; a
    batch would average them (MEMIT) or let the later overwrite the earlier (ROME, FT-L).
    Targets are compared as tokens: one that is a prefix of the other ("Rome" and "Rome,
    Italy") is compatible. Identical requests are allowed.

    Raises:
        ValueError: naming both requests, the prompt and the two targets; or a target that
            `tracer.prompts.target_ids` refuses (empty, longer than `n_ctx`).
    """
    seen: dict[str, tuple[int, Any, list[int]]] = {}
    for i, r in enumerate(requests):
        tids = target_ids(model, r.filled, r.target_new)
        text = r.filled.rstrip()  # the scorers give trailing spaces to the target: "of " -> " Berlin" is "of" -> " Berlin"
        if text not in seen:
            seen[text] = (i, r, tids)
            continue
        j, other, oids = seen[text]
        n = min(len(tids), len(oids))
        if tids[:n] != oids[:n]:
            raise ValueError(
                f"requests {j} and {i} ask for different targets ({other.target_new!r} vs {r.target_new!r}) "
                f"after the same prompt {text!r}; both cannot hold. Edit them separately or drop one"
            )


def check_reach(model, method: str, requests: Sequence, reaching: Sequence[int], field: str) -> None:
    """Refuse an edit whose changed values cannot reach the position the target is read at.

    ROME and MEMIT change the MLP output at the subject's last token. The model predicts the
    target at the prompt's last token, which sees that change only through attention in a
    later block. At the last block there is no later block: the value optimisation gets no
    gradient and ends with a zero delta, while the edit reports itself applied. A request
    whose subject ends its prompt is fine at any layer (the two positions coincide).

    Args:
        model: the model.
        method: the method's name in messages ("ROME", "MEMIT").
        requests: the `EditRequest`s.
        reaching: the layers whose optimised values carry the edit (ROME: its layer; MEMIT's
            "residual" spread: the top layer, where `z` is optimised; "joint": every layer).
        field: the hparams field named in the message.

    Raises:
        ValueError: every layer in `reaching` is the last block and some request's subject
            does not end its prompt (or is not found in it, `locate_subject`).
    """
    last = int(model.cfg.n_layers) - 1
    if any(l < last for l in reaching):
        return
    hint = f"a layer <= {last - 1}"
    if method == "MEMIT":
        hint = f"layers ending at <= {last - 1}, spread='joint' with layers below {last}"
    for i, r in enumerate(requests):
        p = locate_subject(model, r.prompt, r.subject)
        if p.last_subject != len(p.ids) - 1:
            raise ValueError(
                f"{method} cannot edit at {field} {tuple(reaching) if len(reaching) > 1 else reaching[0]}, the last "
                f"block of this {last + 1}-layer model, for request {i} ({r.filled!r}): the subject's last token "
                f"(position {p.last_subject}) is not the prompt's last token (position {len(p.ids) - 1}), where "
                "the target is predicted, and a change to the last block's MLP output reaches no later position, "
                f"so the edit would be a zero delta. Use {hint}, or FT-L (which trains W_out at the prediction "
                "position)"
            )


def check_device(model, device) -> None:
    """`device`, when given, must be the model's device (editors compute where the model is).

    Raises:
        ValueError: `device` is not None and differs from the model's device.
    """
    if device is not None and torch.device(device) != model_device(model):
        raise ValueError(f"device {device!r} differs from the model's {model_device(model)}; move the model first")


def warn_detached_saes(model, first_layer: int) -> list[str]:
    """Warn about SAEs that sae-lens attached with `use_error_term=True` at or after the edit.

    sae-lens adds the error term under `torch.no_grad()`, so the forward pass is the model's
    but gradients through the spliced point follow the SAE's reconstruction: an edit's
    optimisation through it is not the model's.

    Args:
        model: the model.
        first_layer: the lowest edited layer.

    Returns:
        The hook names warned about (empty when none).
    """
    bad = [n for n, err in attached_saes(model).items() if err and hook_layer(n, model.cfg.n_layers) >= first_layer]
    if bad:
        log.warning(
            "SAEs with use_error_term=True are attached at %s, at or after edit layer %d: sae-lens "
            "detaches their error term, so the edit's optimisation follows the SAEs' reconstruction, "
            "not the model. Compute the edit with them removed (model.reset_saes()), then attach them "
            "again and apply it.", bad, first_layer,
        )
    return bad


def check_finite(x: Tensor, what: str, advice: str) -> None:
    """Refuse a tensor with NaN or inf entries.

    Raises:
        ValueError: "`what` has N non-finite entries (NaN or inf); `advice`".
    """
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"{what} has {bad} non-finite entries (NaN or inf); {advice}")


def check_edit(model, method: str, requests: Sequence, hp, *, stats=None, device=None) -> None:
    """Every check an editor's `edit_many` runs before it computes or changes anything.

    Args:
        model: the TransformerLens model.
        method: "rome", "memit", "alphaedit" or "ft-l".
        requests: the `EditRequest`s (already normalised by `as_requests`).
        hp: the method's hyperparameters.
        stats: key statistics passed by the caller (ROME: a Tensor, MEMIT: a dict), or None
            when they will be loaded or computed with `hp.mom2_n_tokens`. Ignored for FT-L.
        device: the `device` argument of the editor.

    Raises:
        ValueError: an unknown `method`; else see `check_layers`, `check_device`,
            `check_requests`, `check_stats`, `check_stats_tokens` and `check_reach`.

    Example:
        >>> check_edit(model, "memit", requests, memit_hparams(model), stats=None, device=None)
    """
    n = int(model.cfg.n_layers)
    if method in ("memit", "alphaedit"):
        field, layers = "hparams.layers", check_layers(hp.layers, "hparams.layers", n)
    elif method in ("rome", "ft-l"):
        field, layers = "hparams.layer", (check_layer(hp.layer, "hparams.layer", n),)
    else:
        raise ValueError(f"method {method!r} must be 'rome', 'memit', 'alphaedit' or 'ft-l'")
    check_device(model, device)
    check_requests(model, requests)
    warn_detached_saes(model, min(layers))
    if method == "ft-l":
        # FT-L trains W_out on the keys at the prediction positions themselves, so it can
        # work at any layer, the last included: no reach check, and no key statistics.
        return
    if stats is None:
        check_stats_tokens(model, hp.mom2_n_tokens)
    else:
        check_stats(model, stats, layers)
    if method in ("memit", "alphaedit") and hp.spread != "joint":
        field = "hparams.layers[-1]"  # the "residual" spread optimises z at the top layer only
        layers = layers[-1:]
    check_reach(model, method.upper(), requests, layers, field)
