"""Prompt helpers: subject token spans, target tokenization and target probabilities.

Every later module needs the same three things, and each is easy to get subtly wrong
across tokenizers (BPE leading spaces, SentencePiece `▁`, a BOS token or not):

- `locate_subject`: token ids of a prompt and the `[start, end)` span of the subject;
- `target_ids`: the tokens a target adds after a prompt, with a leading space where the
  tokenizer needs one;
- `target_probs`: first-token and whole-sequence probabilities of target continuations.

Three rules hold for all of them, so every scorer (tracing, the editors, the benchmarks)
sees the same tokens:

- BOS comes first exactly when `tracer.model.bos_ids` says so (the tokenizer's convention
  unless you override it);
- a prompt's trailing spaces belong to what follows: a tokenizer joins a space to the next
  word (`" Paris"`, `"▁Paris"`), so `"... is "` is encoded as `"... is"` and the target
  after it gets the space, the tokens the text `"... is Paris"` really has;
- a sequence longer than the model's context `n_ctx` raises a `ValueError`
  (`tracer.model.check_context`) before any forward pass.

Example:
    >>> from tracer import load_model, locate_subject, target_probs
    >>> model = load_model("gemma-3-270m")
    >>> p = locate_subject(model, "The Eiffel Tower is located in the city of", "Eiffel Tower")
    >>> p.subject_tokens
    ['▁Eiffel', '▁Tower']
    >>> target_probs(model, [p.prompt], ["Paris"]).first  # doctest: +SKIP
    tensor([0.7626])
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tracer.batching import pad_tokens, pick, position_log_probs, teacher_forced
from tracer.model import bos_ids, check_context, model_device


@dataclass(frozen=True)
class PromptTokens:
    """A tokenized prompt with its subject located.

    Attributes:
        prompt: the prompt text, with the subject filled in.
        ids: token ids as the model sees them (BOS first when the model prepends one).
        subject: `(start, end)` token span of the subject, end exclusive, indexing `ids`.
        tokens: the token strings, for display.
    """

    prompt: str
    ids: tuple[int, ...]
    subject: tuple[int, int]
    tokens: tuple[str, ...]

    @property
    def last_subject(self) -> int:
        """Index of the last subject token."""
        return self.subject[1] - 1

    @property
    def subject_tokens(self) -> list[str]:
        """The subject's token strings, `ids[start:end]` decoded."""
        return list(self.tokens[self.subject[0] : self.subject[1]])

    def tensor(self, device: torch.device | str | None = None) -> Int[Tensor, "1 pos"]:
        """`ids` as a `[1, pos]` long tensor on `device`."""
        return torch.tensor([self.ids], dtype=torch.long, device=device)


def _tokenizer(model):
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("model has no tokenizer; pass a model loaded with one (model.tokenizer is None)")
    return tok


def _bos(model) -> list[int]:
    _tokenizer(model)  # a clear error for a model without one
    return bos_ids(model)


def _short(text: str, width: int = 60) -> str:
    """`repr` of a text, cut to `width` characters for error messages."""
    return repr(text if len(text) <= width else text[: width - 3] + "...")


def canonical_prompt(prompt: str) -> str:
    """The prompt as romelens tokenizes it: trailing spaces dropped (they belong to what follows).

    Example:
        >>> canonical_prompt("The capital of France is ")
        'The capital of France is'
    """
    return prompt.rstrip(" ")


def _encode_with_offsets(tok, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` (no special tokens) and each token's character span."""
    try:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, TypeError, ValueError):
        pass
    # Slow tokenizers have no offsets: derive them from growing decoded prefixes.
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    offsets, prev = [], 0
    for i in range(len(ids)):
        end = len(tok.decode(ids[: i + 1]))
        offsets.append((prev, end))
        prev = end
    return ids, offsets


def encode(model, text: str) -> list[int]:
    """Token ids of `text` as the model sees them: BOS (if the model uses one) then the text.

    Trailing spaces are dropped (`canonical_prompt`): the next token carries its own space.

    Args:
        model: a TransformerLens model with a tokenizer.
        text: the prompt text.

    Returns:
        The token ids, `[pos]` as a list, BOS first when the model prepends one.

    Raises:
        ValueError: `text` is empty, longer than the model's context `n_ctx`, or the model
            has no tokenizer.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"prompt {text!r} is empty; expected a non-empty string")
    ids = _bos(model) + _encode_with_offsets(_tokenizer(model), canonical_prompt(text))[0]
    check_context(model, len(ids), f"prompt {_short(text)}")
    return ids


def locate_subject(model, prompt: str, subject: str) -> PromptTokens:
    """Tokenize `prompt` and find the token span of `subject` inside it.

    `prompt` may be a template with a `{}` placeholder (CounterFact style), which is filled
    with `subject` and located exactly there. Otherwise the subject is searched for as text;
    when it occurs more than once, the **last** occurrence is used, since that is the one
    closest to the prediction. The span covers every token that overlaps the subject's
    characters, so a BPE token that carries the leading space (`" Eiffel"`, `"▁Eiffel"`)
    is included and a subject at the very start of the prompt works. Trailing spaces of
    the filled prompt are dropped, as in `encode`.

    Args:
        model: a TransformerLens model with a tokenizer.
        prompt: the prompt text, or a template containing `{}`.
        subject: the subject string.

    Returns:
        A `PromptTokens` with ids, the subject span and token strings.

    Raises:
        ValueError: an empty prompt or subject, a subject not in the prompt (or covering
            no token of it), a prompt longer than the model's context `n_ctx`, or a model
            without a tokenizer.

    Example:
        >>> locate_subject(model, "{} is located in", "Eiffel Tower").subject
        (1, 3)
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt {prompt!r} is empty; expected a non-empty string")
    if not isinstance(subject, str) or not subject.strip():
        raise ValueError(f"subject {subject!r} is empty; expected a non-empty string")
    if "{}" in prompt:
        start_char = prompt.index("{}")
        text = prompt.replace("{}", subject, 1)
    else:
        start_char = prompt.rfind(subject)
        text = prompt
        if start_char < 0:
            raise ValueError(f"subject {subject!r} not found in prompt {prompt!r}")
    end_char = start_char + len(subject)
    text = canonical_prompt(text)
    tok = _tokenizer(model)
    ids, offsets = _encode_with_offsets(tok, text)
    hits = [i for i, (a, b) in enumerate(offsets) if a < end_char and b > start_char]
    if not hits:
        raise ValueError(f"subject {subject!r} covers no token of prompt {text!r}")
    bos = _bos(model)
    span = (hits[0] + len(bos), hits[-1] + 1 + len(bos))
    all_ids = bos + ids
    check_context(model, len(all_ids), f"prompt {_short(text)}")
    return PromptTokens(
        prompt=text,
        ids=tuple(all_ids),
        subject=span,
        tokens=tuple(tok.convert_ids_to_tokens(all_ids)),
    )


def token_ids(model, ids, field: str = "target") -> list[int]:
    """`ids` (one token id or a sequence of them) as a list of ints, each checked against the vocabulary.

    Every public entry that takes token ids comes here, so an id outside the vocabulary is
    refused with its value instead of failing deep in a forward pass (an `IndexError`, or a
    CUDA assert) or, for a negative id, silently scoring another token from the end.

    Args:
        model: a TransformerLens model; its `cfg.d_vocab` bounds the ids.
        ids: an int, an integer tensor (0-d or 1-d), or a sequence of ints (numpy ints too).
        field: the argument's name in messages.

    Returns:
        A non-empty list of ints in `[0, d_vocab)`.

    Raises:
        ValueError: a bool, a float or other non-integer id, an empty sequence, or an id
            outside `[0, d_vocab)`.

    Example:
        >>> token_ids(model, 7), token_ids(model, [7, 8])
        ([7], [7, 8])
    """
    if isinstance(ids, Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.ndim > 1:
            raise ValueError(f"{field} {ids!r} must be token id(s): an int or a 1-d integer tensor")
        ids = ids.reshape(-1).tolist()
    items = [ids] if isinstance(ids, numbers.Integral) else ids
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise ValueError(f"{field} {ids!r} must be text, a token id or a sequence of token ids, not {type(ids).__name__}")
    if len(items) == 0:
        raise ValueError(f"{field} token list {ids!r} is empty; expected at least one token id")
    d_vocab = int(model.cfg.d_vocab)
    for t in items:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise ValueError(f"{field} token id {t!r} must be an int, not {type(t).__name__}")
        if not 0 <= t < d_vocab:
            raise ValueError(f"{field} token id {t} is outside the vocabulary: expected 0 <= id < d_vocab {d_vocab}")
    return [int(t) for t in items]


def target_ids(model, prompt: str, target: str | int | Sequence[int]) -> list[int]:
    """Token ids that `target` adds when it follows `prompt`.

    The boundary is one space, as a tokenizer would see the whole text: "Paris" after
    "... city of" is `" Paris"`, and so is "Paris" after "... city of " (the prompt's
    trailing space moves to the target; `encode` drops it from the prompt), so the scored
    tokens are the ones `"... city of Paris"` really has, never a lone-space token followed
    by a space-less word. A target that starts with other whitespace (`"\nParis"`), or
    follows a prompt ending in a newline, is joined as is. The ids are those that
    tokenizing the joined text adds after the prompt's own tokens, which is right for BPE
    and SentencePiece alike; multi-token targets return several ids. An int or a list of
    ints is taken as token ids already, each checked to be in `[0, d_vocab)` (`token_ids`).

    Args:
        model: a TransformerLens model with a tokenizer.
        prompt: the filled prompt (no `{}`).
        target: target text, or token id(s).

    Returns:
        A non-empty list of token ids, `[n_target_tokens]`.

    Raises:
        ValueError: an empty target, a token id that is not an int in `[0, d_vocab)`
            (`token_ids`), prompt and target together longer than the model's context
            `n_ctx`, or a model without a tokenizer.

    Example:
        >>> target_ids(model, "The capital of France is ", "Paris") == target_ids(model, "The capital of France is", "Paris")
        True
    """
    tok = _tokenizer(model)
    head = canonical_prompt(prompt)
    before = _encode_with_offsets(tok, head)[0] if head else []
    if not isinstance(target, str):
        ids = token_ids(model, target, "target")
    else:
        if not target.strip():
            raise ValueError(f"target {target!r} is empty; expected a non-empty string")
        body = target.lstrip(" ")
        spaced = head != prompt or body != target  # a space at the boundary, on either side
        tail = body if not spaced and (body[0].isspace() or head[-1:].isspace()) else " " + body
        joined = _encode_with_offsets(tok, head + tail)[0]
        if joined[: len(before)] == before and len(joined) > len(before):
            ids = joined[len(before) :]
        else:  # the tokenizer merged across the boundary; tokenize the target on its own
            ids = _encode_with_offsets(tok, tail)[0]
    check_context(model, len(_bos(model)) + len(before) + len(ids), f"prompt {_short(prompt)} with target {_short(str(target))}")
    return ids


@dataclass(frozen=True)
class TargetProbs:
    """Probabilities of target continuations, one entry per (prompt, target) pair.

    Attributes:
        first: probability of the target's first token, `[n]`, in [0, 1].
        seq: probability of the whole target sequence (product over its tokens), `[n]`.
        mean_nll: mean negative log-likelihood per target token, `[n]`, in nats.
            `exp(-mean_nll)` is the per-token probability that the ROME/MEMIT CounterFact
            metrics compare.
        n_tokens: number of target tokens, `[n]`, tokens.
    """

    first: Float[Tensor, " n"]
    seq: Float[Tensor, " n"]
    mean_nll: Float[Tensor, " n"]
    n_tokens: Int[Tensor, " n"]


@torch.no_grad()
def target_probs(
    model,
    prompts: Sequence[str],
    targets: Sequence[str | int | Sequence[int]],
    *,
    batch_size: int = 16,
) -> TargetProbs:
    """Score target continuations of prompts under the model (teacher forcing).

    Only the positions that predict target tokens are unembedded, which matters for
    large vocabularies (Gemma-3: 262k tokens). Sequences are right-padded, so a causal
    model's scores do not depend on the batch they share.

    Args:
        model: a TransformerLens model with a tokenizer.
        prompts: `[n]` filled prompts.
        targets: `[n]`, one target per prompt (text or token ids).
        batch_size: (prompt, target) pairs per forward pass.

    Returns:
        A `TargetProbs` of `[n]` CPU tensors (probabilities, and NLL in nats).

    Raises:
        ValueError: `prompts` and `targets` differ in length, `batch_size` < 1, or any
            pair fails `encode` / `target_ids` (empty, out-of-vocabulary ids, longer than
            `n_ctx`, no tokenizer).

    Example:
        >>> target_probs(model, ["The capital of France is"], ["Paris"]).first
    """
    if len(prompts) != len(targets):
        raise ValueError(f"prompts and targets differ in length ({len(prompts)} vs {len(targets)})")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be >= 1")
    device = model_device(model)
    pairs = [(encode(model, p), target_ids(model, p, t)) for p, t in zip(prompts, targets)]
    nll_sum, first_lp, counts = [], [], []
    for b in range(0, len(pairs), batch_size):
        tf = teacher_forced(pairs[b : b + batch_size])  # row i: prompt + target, right-padded
        tokens = pad_tokens(model, tf.seqs, device)
        lp = position_log_probs(model, tokens, tf.rows_tensor(device), tf.cols_tensor(device))  # [m, d_vocab]
        lp = pick(lp, tf.targets_tensor(device))  # [m], nats
        for seg in tf.split(lp):  # one pair's target tokens
            nll_sum.append(-seg.sum())
            first_lp.append(seg[0])
            counts.append(len(seg))
    nll = torch.stack(nll_sum).cpu()
    n = torch.tensor(counts)
    return TargetProbs(
        first=torch.stack(first_lp).exp().cpu(),
        seq=(-nll).exp(),
        mean_nll=nll / n,
        n_tokens=n,
    )
