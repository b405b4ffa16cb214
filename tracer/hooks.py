"""Hook names shared by every module: the one place that spells TransformerLens hook points.

Both `HookedTransformer` (TransformerLens 3.x) and `TransformerBridge` in
compatibility mode (4.x) expose the same names, built by
`transformer_lens.utils.get_act_name`. Weight orientation is stated here once:

- `W_out` of block `l` is `[d_mlp, d_model]`;
- the *key* of block `l` is what `blocks.{l}.mlp.hook_post` carries, `[batch, pos, d_mlp]`;
- the *value* is what `blocks.{l}.hook_mlp_out` carries, `[batch, pos, d_model]`;
- a rank-one edit is `W_out += outer(u, v)` with `u: [d_mlp]`, `v: [d_model]`.

Example:
    >>> from tracer.hooks import hook_name
    >>> hook_name("mlp", 3)
    'blocks.3.hook_mlp_out'
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Literal

from tracer.model import get_act_name  # from where the installed TransformerLens keeps it

Kind = Literal["resid", "mlp", "attn"]
KINDS: tuple[str, ...] = ("resid", "mlp", "attn")

EMBED = get_act_name("embed")  # "hook_embed": token embeddings, where subject noise is added

_ACT = {
    "resid": "resid_post",  # block output: the paper's hidden state h_i^(l)
    "resid_pre": "resid_pre",  # block input
    "mlp": "mlp_out",  # MLP output m_i^(l)
    "attn": "attn_out",  # attention output a_i^(l)
    "key": "post",  # MLP hidden activation: the key k that W_out reads
}


def hook_name(kind: str, layer: int) -> str:
    """Name of the hook point that carries `kind` at block `layer`.

    Args:
        kind: one of "resid" (block output), "resid_pre" (block input), "mlp" (MLP output),
            "attn" (attention output) or "key" (MLP hidden activation read by `W_out`).
        layer: block index, 0-based.

    Returns:
        The hook name, e.g. `"blocks.3.hook_mlp_out"`.

    Raises:
        ValueError: `kind` is not one of the names above.
    """
    try:
        act = _ACT[kind]
    except KeyError:
        raise ValueError(f"kind {kind!r} is not one of {sorted(_ACT)}") from None
    return get_act_name(act, layer)


#: sae-lens's `HookedSAETransformer.add_sae` splices an SAE in place of the hook point it
#: reads: the name then leads to a wrapper whose `hook_sae_input` sees what the point
#: received and whose `hook_sae_output` carries what flows on (the reconstruction, plus the
#: error term with `use_error_term=True`).
SAE_SIDES = {"output": "hook_sae_output", "input": "hook_sae_input"}


def resolve_hook(model, name: str, *, side: str = "output") -> str:
    """The hook point that carries `name`'s activation on `model`, SAEs included.

    On a plain TransformerLens model this is `name`. Where sae-lens has attached an SAE at
    `name` (`HookedSAETransformer.add_sae`), `name` is no longer a hook point: the stream
    that later layers read is `name + ".hook_sae_output"` (`side="output"`, for reading
    a state or writing a replacement for it) and what the point received is
    `name + ".hook_sae_input"` (`side="input"`, for a state that is fed back into the model
    at `start_at_layer`, which runs the SAE again).

    Raises:
        ValueError: `side` is not "output" or "input".

    Example:
        >>> resolve_hook(sae_model, "blocks.1.hook_resid_post")   # SAE attached there
        'blocks.1.hook_resid_post.hook_sae_output'
    """
    if side not in SAE_SIDES:
        raise ValueError(f"side {side!r} must be one of {tuple(SAE_SIDES)}")
    points = getattr(model, "hook_dict", None)
    if points is None or name in points:
        return name
    spliced = f"{name}.{SAE_SIDES[side]}"
    return spliced if spliced in points else name


@contextmanager
def hooks(model, fwd_hooks: list[tuple[str, Callable]], *, side: str = "output") -> Iterator[None]:
    """`model.hooks(fwd_hooks=...)` with every name passed through `resolve_hook`.

    Raises:
        ValueError: a bad `side` (see `resolve_hook`).
    """
    with model.hooks(fwd_hooks=[(resolve_hook(model, n, side=side) if isinstance(n, str) else n, f) for n, f in fwd_hooks]):
        yield


def attached_saes(model) -> dict[str, bool]:
    """The SAEs sae-lens has attached to `model`: `{hook name: use_error_term}` (`{}` for a
    model without sae-lens support or without SAEs)."""
    saes = getattr(model, "acts_to_saes", None)
    if not isinstance(saes, dict):
        return {}
    wrappers = getattr(model, "_acts_to_saes", {})  # sae-lens keeps use_error_term on its wrapper
    return {name: bool(getattr(wrappers.get(name), "use_error_term", False)) for name in saes}


def hook_layer(name: str, n_layers: int) -> int:
    """The block a hook point belongs to: `l` for `blocks.l.*`, -1 before the first block
    (`hook_embed`, `hook_pos_embed`), `n_layers` after the last (`ln_final.*`, `unembed.*`).

    Example:
        >>> hook_layer("blocks.1.hook_resid_post.hook_sae_acts_post", 18), hook_layer("hook_embed", 18)
        (1, -1)
    """
    head, _, rest = name.partition(".")
    if head == "blocks":
        return int(rest.partition(".")[0])
    return -1 if name.startswith(("hook_embed", "hook_pos_embed", "embed", "pos_embed")) else n_layers


def check_kind(kind: str) -> str:
    """Return `kind` if it is a traceable kind ("resid", "mlp", "attn").

    Raises:
        ValueError: any other `kind`.
    """
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is unknown; expected one of {KINDS}")
    return kind
