"""Batches of token sequences: padding, and teacher-forced log-probs. Every module builds its
batches and scores its targets through the functions here.

The plumbing of a romelens forward pass lives in two modules:

- `tracer.model` (the adapter): BOS (`bos_ids`, `prepends_bos`, `set_prepend_bos`), the
  context check (`check_context`), stopping a forward pass at a hook point (`run_until`,
  the one early-stop helper) and unembedding only chosen positions (`unembed_positions`);
- this module: the rest.

  - Padding. `pad_tokens` right-pads sequences into one `[n, width]` batch with the
    tokenizer's pad id (`pad_id`, 0 without one). A causal model's activations at the real
    positions never see what follows them, so a right-padded batch needs no attention mask
    and gives each sequence the scores it gets alone. `pad_left` left-pads, with a mask, for
    generation, where every row's last position must line up.
  - Teacher forcing. `teacher_forced` lays (prompt ids, target ids) pairs out so that
    position `len(prompt) - 1 + j` of each row predicts target token `j`;
    `position_log_probs` unembeds only those positions (a 262k vocabulary is never
    unembedded at every position) and `log_probs` / `pick` turn logits into the
    log-probability of each target token.

Example:
    >>> from tracer.batching import pad_tokens, pick, position_log_probs, teacher_forced
    >>> tf = teacher_forced([(encode(model, "The capital of France is"), target_ids(model, "...", "Paris"))])
    >>> tokens = pad_tokens(model, tf.seqs, "cpu")                       # [1, width]
    >>> lp = position_log_probs(model, tokens, tf.rows_tensor(), tf.cols_tensor())   # [m, d_vocab]
    >>> nll = -pick(lp, tf.targets_tensor()).mean()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tracer.model import unembed_positions

# ----------------------------------------------------------------------------- padding


def pad_id(model) -> int:
    """The id padding is filled with: the tokenizer's `pad_token_id`, or 0 without one."""
    pad = model.tokenizer.pad_token_id
    return int(pad) if pad is not None else 0


def pad_tokens(model, seqs: Sequence[Sequence[int]], device) -> Int[Tensor, "n width"]:
    """Right-pad token id sequences into one `[n, max_len]` long tensor on `device`.

    Padding uses `pad_id(model)` and sits after each sequence, so a causal model's
    activations at the real positions do not depend on the padding.

    Args:
        model: a TransformerLens model with a tokenizer (for the pad id).
        seqs: token id sequences.
        device: where the batch is made.

    Returns:
        `[n, max_len]` long tensor; row `i` holds `seqs[i]` then padding.

    Raises:
        ValueError: `seqs` is empty.

    Example:
        >>> pad_tokens(model, [[1, 2, 3], [4]], "cpu")     # [[1, 2, 3], [4, pad, pad]]
    """
    if len(seqs) == 0:
        raise ValueError("seqs is empty; expected at least one token sequence")
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad_id(model), dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(list(s), dtype=torch.long, device=device)
    return tokens


def pad_left(model, seqs: Sequence[Sequence[int]], device) -> tuple[Int[Tensor, "n width"], Int[Tensor, "n width"]]:
    """Left-pad token id sequences into one batch, with its attention mask (1 on real tokens).

    For generation: every row's last real token sits at the last position.

    Args:
        model: a TransformerLens model with a tokenizer (for the pad id).
        seqs: token id sequences.
        device: where the batch is made.

    Returns:
        `(tokens, mask)`, each `[n, max_len]` long: padding then `seqs[i]`; the mask is 1 on
        real tokens, 0 on padding.

    Raises:
        ValueError: `seqs` is empty.

    Example:
        >>> tokens, mask = pad_left(model, [[1, 2, 3], [4]], "cpu")   # [[1, 2, 3], [pad, pad, 4]]
    """
    if len(seqs) == 0:
        raise ValueError("seqs is empty; expected at least one token sequence")
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad_id(model), dtype=torch.long, device=device)
    mask = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        tokens[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long, device=device)
        mask[i, width - len(s) :] = 1
    return tokens, mask


# ----------------------------------------------------------------------------- teacher forcing


@dataclass(frozen=True, kw_only=True)
class TeacherForced:
    """(prompt, target) pairs laid out for one teacher-forced forward pass.

    Attributes:
        seqs: the input rows, one per pair: prompt ids then target ids (the last target
            token only with `feed_last`); pad them with `pad_tokens`.
        rows: for each target token, in pair order, the row that predicts it (`[m]`).
        cols: the position predicting it, `len(prompt) - 1 + j` for target token `j`.
        targets: the target token ids (`[m]`).
        lengths: target tokens per pair; `split` cuts `[m]` values back into pairs.
    """

    seqs: tuple[tuple[int, ...], ...]
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    targets: tuple[int, ...]
    lengths: tuple[int, ...]

    def rows_tensor(self, device=None) -> Int[Tensor, " m"]:
        """`rows` as a `[m]` long tensor on `device` (CPU when None)."""
        return torch.tensor(self.rows, dtype=torch.long, device=device)

    def cols_tensor(self, device=None) -> Int[Tensor, " m"]:
        """`cols` as a `[m]` long tensor on `device` (CPU when None)."""
        return torch.tensor(self.cols, dtype=torch.long, device=device)

    def targets_tensor(self, device=None) -> Int[Tensor, " m"]:
        """`targets` (token ids) as a `[m]` long tensor on `device` (CPU when None)."""
        return torch.tensor(self.targets, dtype=torch.long, device=device)

    def split(self, values: Sequence) -> list:
        """`values` (one per target token, `[m]`) cut into one piece per pair.

        Args:
            values: a `[m]` tensor or a sequence of length `m`, in target-token order.

        Returns:
            A list with one slice per pair, of `lengths[i]` values each.
        """
        out, k = [], 0
        for n in self.lengths:
            out.append(values[k : k + n])
            k += n
        return out


def teacher_forced(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, feed_last: bool = True, first_row: int = 0
) -> TeacherForced:
    """Lay out `(prompt ids, target ids)` pairs for teacher forcing, one row per pair.

    Args:
        pairs: prompt ids (BOS included where the model uses one) and non-empty target ids.
        feed_last: whether the last target token is fed as input too. It predicts nothing
            scored, so False gives the shortest rows; True keeps `prompt + target` whole.
        first_row: the row index of the first pair, for callers that put other rows before.

    Returns:
        A `TeacherForced`.

    Raises:
        ValueError: a pair has no target tokens, or no prompt tokens.

    Example:
        >>> teacher_forced([([1, 2], [7, 8])]).cols       # positions 1 and 2 predict 7 and 8
        (1, 2)
    """
    seqs, rows, cols, targets, lengths = [], [], [], [], []
    for i, (p, t) in enumerate(pairs):
        if len(p) == 0 or len(t) == 0:
            raise ValueError(f"pair {i} has {len(p)} prompt and {len(t)} target tokens; expected at least one of each")
        seqs.append((*p, *(t if feed_last else t[:-1])))
        for j, tid in enumerate(t):
            rows.append(first_row + i)
            cols.append(len(p) - 1 + j)  # position predicting target token j
            targets.append(int(tid))
        lengths.append(len(t))
    return TeacherForced(seqs=tuple(seqs), rows=tuple(rows), cols=tuple(cols), targets=tuple(targets), lengths=tuple(lengths))


def log_probs(logits: Float[Tensor, "... d_vocab"]) -> Float[Tensor, "... d_vocab"]:
    """Log-softmax over the vocabulary, in float32 whatever the model's dtype.

    Returns:
        Log-probabilities in nats, the shape of `logits`.
    """
    return logits.float().log_softmax(-1)


def pick(lp: Float[Tensor, "m d_vocab"], ids: Int[Tensor, " m"] | Sequence[int]) -> Float[Tensor, " m"]:
    """`lp[i, ids[i]]` for each `i < len(ids)`: the log-probability of each wanted token.

    `lp` may have more rows than `ids` (e.g. KL rows after the NLL rows); those are left out.

    Args:
        lp: `[m', d_vocab]` log-probabilities (`m' >= m`).
        ids: `[m]` token ids.

    Returns:
        `[m]` log-probabilities (nats); gradients flow to `lp`.

    `ids` are not range-checked here (a negative id counts from the end of the vocabulary):
    the public entries check target ids first (`tracer.prompts.token_ids`).

    Raises:
        IndexError: `ids` longer than `lp` has rows, or an id `>= d_vocab`.
    """
    ids = torch.as_tensor(ids, dtype=torch.long, device=lp.device)
    return lp[torch.arange(len(ids), device=lp.device), ids]


def position_log_probs(
    model, tokens: Tensor, rows: Int[Tensor, " m"], cols: Int[Tensor, " m"], **kwargs
) -> Float[Tensor, "m d_vocab"]:
    """Log-probs (float32) of the next token at positions `(rows[i], cols[i])` of a forward pass.

    Only those positions are unembedded (`tracer.model.unembed_positions`). Hooks active in
    `model.hooks(...)` or `mlp_output_delta` apply; `kwargs` go to the forward call (e.g.
    `start_at_layer`, with `tokens` the residual entering that block). Gradients flow when
    enabled.

    Args:
        model: a TransformerLens model.
        tokens: `[batch, pos]` token ids (e.g. `pad_tokens(model, tf.seqs, device)`).
        rows, cols: `[m]` batch rows and positions to score (`tf.rows_tensor()`, ...).

    Returns:
        `[m, d_vocab]` float32 log-probabilities (nats) of the next token at each position.

    Raises:
        ValueError: `tokens` has more positions than `n_ctx` (`tracer.model.run_until`).

    Example:
        >>> lp = position_log_probs(model, tokens, tf.rows_tensor(), tf.cols_tensor())
        >>> nll = -pick(lp, tf.targets_tensor())                     # [m]
    """
    return log_probs(unembed_positions(model, tokens, rows, cols, **kwargs))


CALL_COST = 90
"""Fixed cost of one forward call (weight copies, hooks), in token-rows; measured on
Gemma-3-270m on the CPU. `prefix_batches` trades it against the positions each batch runs."""


def prefix_batches(tok: Tensor, batch_size: int, n_pos: int) -> list[Tensor]:
    """Rows in batches for runs that compute only positions `min(tok[batch])..n_pos-1`.

    With a key/value cache of the positions before a batch's first changed token, a batch
    costs about `CALL_COST + rows * (n_pos - first)`. Rows are sorted by `tok` and cut into
    batches of whole token groups, at most `batch_size` rows each (a group larger than that
    is split), by dynamic programming over that cost: one batch per token computes the
    fewest positions but pays the fixed cost many times; one batch for all the reverse.

    Args:
        tok: `[rows]` the first position each row must compute (the restored token, or the
            last subject token where a value is optimised).
        batch_size: most rows per batch.
        n_pos: positions in a row.

    Returns:
        Row index tensors, each one batch.

    Example:
        >>> prefix_batches(torch.tensor([5, 0, 5, 9]), 64, 12)   # e.g. [tensor([1, 0, 2, 3])]
    """
    toks = torch.unique(tok).tolist()  # sorted
    groups = [(tok == t).nonzero()[:, 0] for t in toks]
    sizes = [len(g) for g in groups]
    best = [0.0] + [float("inf")] * len(groups)  # best[j]: cost of the first j token groups
    cut = [0] * (len(groups) + 1)
    for j in range(1, len(groups) + 1):
        rows = 0
        for i in range(j, 0, -1):  # last batch = groups i-1 .. j-1, starting at token toks[i-1]
            rows += sizes[i - 1]
            if rows > batch_size and i < j:
                break
            cost = best[i - 1] + CALL_COST + rows * (n_pos - toks[i - 1])
            if cost < best[j]:
                best[j], cut[j] = cost, i - 1
    bounds, j = [], len(groups)
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    out = []
    for i, j in reversed(bounds):
        rows = torch.cat(groups[i:j])
        out += [rows[b : b + batch_size] for b in range(0, len(rows), batch_size)]
    return out
