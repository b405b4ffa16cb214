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

from typing import Literal

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
    """
    try:
        act = _ACT[kind]
    except KeyError:
        raise ValueError(f"kind {kind!r} is not one of {sorted(_ACT)}") from None
    return get_act_name(act, layer)


def check_kind(kind: str) -> str:
    """Return `kind` if it is a traceable kind ("resid", "mlp", "attn"), else raise ValueError."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is unknown; expected one of {KINDS}")
    return kind
