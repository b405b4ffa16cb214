"""Metric arithmetic for CounterFact and zsRE, plus the two model-level helpers they need.

Pure functions (no model) are checked against hand-computed values in the tests:

- `success` / `magnitude`: per-prompt comparisons of `P = exp(-mean token NLL)`;
- `harmonic_mean`: the score S;
- `ngram_entropy`: ROME's generation entropy (2/3 bigram + 4/3 trigram, averaged);
- `Tfidf`: a small TF-IDF (sklearn `TfidfVectorizer` defaults) for reference scores;
- `mean_ci`: mean and 95% confidence half-width.

Model helpers: `greedy_generate` (last-position-only unembedding, so a 262k vocab is
cheap) and `teacher_forced_correct` (zsRE token accuracy).

Example:
    >>> from benchmarks.metrics import ngram_entropy, harmonic_mean
    >>> round(ngram_entropy("a b a b"), 4)  # bigrams {ab:2, ba:1}, trigrams {aba, bab}
    0.9728
    >>> harmonic_mean([1.0, 0.5, 0.5])
    0.6
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

# --------------------------------------------------------------------------- probabilities


def success(nll_a: Sequence[float], nll_b: Sequence[float]) -> list[float]:
    """`[P(a) > P(b)]` per prompt, with `P = exp(-mean token NLL)`, i.e. `nll_a < nll_b`.

    ES/PS use `a = target_new, b = target_true`; NS uses `a = target_true, b = target_new`
    (ROME section 3.3 and Appendix, CounterFact's efficacy, paraphrase and neighborhood scores).

    Args:
        nll_a, nll_b: `[n]` mean token NLLs in nats, one per prompt.

    Returns:
        `[n]` values, 1.0 where `a` is more probable, else 0.0.

    Raises:
        ValueError: `nll_a` and `nll_b` differ in length.

    Example:
        >>> success([0.5, 2.0], [1.0, 1.0])
        [1.0, 0.0]
    """
    if len(nll_a) != len(nll_b):
        raise ValueError(f"nll_a and nll_b differ in length ({len(nll_a)} vs {len(nll_b)})")
    return [float(a < b) for a, b in zip(nll_a, nll_b)]


def magnitude(nll_a: Sequence[float], nll_b: Sequence[float]) -> list[float]:
    """`P(a) - P(b)` per prompt, with `P = exp(-mean token NLL)` (EM, PM, NM).

    The magnitudes of ROME section 3.3 and Appendix (CounterFact efficacy, paraphrase and
    neighborhood magnitude).

    Args:
        nll_a, nll_b: `[n]` mean token NLLs in nats, one per prompt.

    Returns:
        `[n]` probability differences in [-1, 1].

    Raises:
        ValueError: `nll_a` and `nll_b` differ in length.
    """
    if len(nll_a) != len(nll_b):
        raise ValueError(f"nll_a and nll_b differ in length ({len(nll_a)} vs {len(nll_b)})")
    return [math.exp(-a) - math.exp(-b) for a, b in zip(nll_a, nll_b)]


def mean(values: Sequence[float]) -> float:
    """The arithmetic mean of `values`, as a float.

    Raises:
        ValueError: `values` is empty.
    """
    if len(values) == 0:
        raise ValueError("values is empty; expected at least one value")
    return float(sum(values) / len(values))


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0 when any value is 0 (as `scipy.stats.hmean` with zeros).

    The CounterFact score S is the harmonic mean of ES, PS and NS (ROME section 3.3 and Appendix).

    Args:
        values: non-negative numbers.

    Returns:
        `len(values) / sum(1 / v)`, in the units of `values`.

    Raises:
        ValueError: `values` is empty or holds a negative value.

    Example:
        >>> harmonic_mean([1.0, 0.5, 0.5])
        0.6
    """
    if len(values) == 0:
        raise ValueError("values is empty; expected at least one value")
    if any(v < 0 for v in values):
        raise ValueError(f"values {list(values)} must be >= 0")
    if any(v == 0 for v in values):
        return 0.0
    return float(len(values) / sum(1.0 / v for v in values))


def mean_ci(values: Sequence[float], scale: float = 1.0) -> tuple[float, float]:
    """Mean and 95% confidence half-width (normal approximation, `1.96 * sd / sqrt(n)`), both × scale.

    Args:
        values: the per-record values.
        scale: multiplies both (100.0 for the benchmarks' percentages).

    Returns:
        `(mean, half-width)`; the half-width is NaN for a single value (`sd` uses `n - 1`).

    Raises:
        ValueError: `values` is empty.

    Example:
        >>> mean_ci([0.0, 1.0], scale=100.0)[0]
        50.0
    """
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        raise ValueError("values is empty; expected at least one value")
    half = 1.96 * arr.std(ddof=1) / math.sqrt(arr.size) if arr.size > 1 else float("nan")
    return float(arr.mean() * scale), float(half * scale)


# --------------------------------------------------------------------------- generation entropy

_WORD = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


def word_tokenize(text: str) -> list[str]:
    """Words and punctuation marks (a dependency-free stand-in for `nltk.word_tokenize`)."""
    return _WORD.findall(text)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's n-gram entropy of one text: mean over n of `weight_n * H(n-gram distribution)` in bits.

    With the defaults this is `(2/3 * H2 + 4/3 * H3) / 2`, the generation entropy GE of ROME
    section 3.3 and Appendix (fluency). A text too short to have any n-gram contributes 0 for that n.

    Args:
        text: one generated text (split by `word_tokenize`).
        ns: the n-gram orders.
        weights: one weight per order.

    Returns:
        The entropy in bits (>= 0).

    Raises:
        ValueError: `ns` and `weights` differ in length.

    Example:
        >>> round(ngram_entropy("a b a b"), 4)
        0.9728
    """
    if len(ns) != len(weights):
        raise ValueError(f"ns {tuple(ns)} and weights {tuple(weights)} differ in length")
    words = word_tokenize(text)
    parts = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum((c / total) * math.log2(c / total) for c in grams.values()) if total else 0.0
        parts.append(w * h)
    return float(np.mean(parts))


# --------------------------------------------------------------------------- TF-IDF

_TFIDF_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # sklearn's default token_pattern


@dataclass(frozen=True, kw_only=True)
class Tfidf:
    """A TF-IDF vectorizer with sklearn `TfidfVectorizer` defaults (lowercase, 2+ char words, l2).

    The reference score RS (consistency) of ROME section 3.3 and Appendix is the cosine of the
    TF-IDF vectors of the generations and of reference texts about the new object.

    Raises:
        ValueError: from `fit` (no document) and `from_files` (files that do not match).

    Attributes:
        vocab: word -> column.
        idf: inverse document frequency per column.
        label: where the statistics come from (reported next to RS).

    Example:
        >>> tf = Tfidf.fit(["paris is in france", "rome is in italy"])
        >>> round(tf.similarity("paris france", "france paris"), 3)
        1.0
    """

    vocab: dict
    idf: np.ndarray
    label: str = "fitted"

    @classmethod
    def fit(cls, documents: Iterable[str], label: str = "fitted") -> "Tfidf":
        """Smoothed idf `ln((1 + n) / (1 + df)) + 1`, as sklearn computes it.

        Args:
            documents: the texts (`n` documents; `df` counts the documents holding a word).
            label: where the statistics come from, reported next to RS.

        Returns:
            A `Tfidf` over every word of 2+ characters in `documents`.

        Raises:
            ValueError: `documents` is empty.
        """
        df: Counter = Counter()
        n = 0
        for doc in documents:
            n += 1
            df.update(set(_TFIDF_TOKEN.findall(doc.lower())))
        if n == 0:
            raise ValueError("documents is empty; expected at least one document")
        words = sorted(df)
        idf = np.array([math.log((1 + n) / (1 + df[w])) + 1.0 for w in words])
        return cls(vocab={w: i for i, w in enumerate(words)}, idf=idf, label=label)

    @classmethod
    def from_files(cls, idf_path: str | os.PathLike, vocab_path: str | os.PathLike) -> "Tfidf":
        """ROME's `idf.npy` and `tfidf_vocab.json`, labelled `"ROME idf.npy"`.

        Args:
            idf_path: the `[n_words]` idf array (`.npy`).
            vocab_path: the JSON `{word: column}`.

        Returns:
            A `Tfidf` with ROME's statistics (RS comparable with the published one).

        Raises:
            ValueError: the vocabulary and idf sizes do not match, or a column is out of range.
            OSError: a file cannot be read.
        """
        idf = np.load(idf_path)
        with open(vocab_path, encoding="utf-8") as f:
            vocab = json.load(f)
        if len(vocab) != len(idf) or max(vocab.values()) >= len(idf):
            raise ValueError(f"vocab_path {str(vocab_path)!r} does not match idf_path {str(idf_path)!r}")
        return cls(vocab=vocab, idf=idf, label="ROME idf.npy")

    def vector(self, text: str) -> np.ndarray:
        """The l2-normalised TF-IDF vector of `text`, `[n_words]` (all zeros with no known word)."""
        v = np.zeros(len(self.idf))
        for w in _TFIDF_TOKEN.findall(text.lower()):
            j = self.vocab.get(w)
            if j is not None:
                v[j] += 1.0
        v *= self.idf
        norm = np.linalg.norm(v)
        return v / norm if norm > 0 else v

    def similarity(self, text_a: str, text_b: str) -> float:
        """Cosine similarity of the two texts' TF-IDF vectors (0 when either has no known word)."""
        return float(self.vector(text_a) @ self.vector(text_b))


def load_attribute_snippets(path: str | os.PathLike) -> dict:
    """ROME's `attribute_snippets.json` as `{relation_id: {target_id: [texts]}}`.

    Args:
        path: the JSON file (a list of `{relation_id, target_id, samples: [{text}]}`).

    Returns:
        The snippet texts by relation and target id (RS references).

    Raises:
        ValueError: an entry without `relation_id`, `target_id` or `samples`, or a file
            that is not JSON (`json.JSONDecodeError`).
        OSError: the file cannot be read.
    """
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    out: dict = {}
    for el in raw:
        for key in ("relation_id", "target_id", "samples"):
            if key not in el:
                raise ValueError(f"attribute snippets {str(path)!r}: an entry is missing field {key!r}")
        out.setdefault(el["relation_id"], {}).setdefault(el["target_id"], []).extend(
            s["text"] for s in el["samples"]
        )
    return out


def wikitext_documents(text: str) -> list[str]:
    """Paragraphs of WikiText raw text (non-empty lines that are not `= Heading =` lines)."""
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("=")]


# --------------------------------------------------------------------------- model helpers


@torch.no_grad()
def target_nll(model, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = 16) -> list[float]:
    """Mean token NLL of each target after its prompt (teacher forced); `exp(-x)` is ROME's P.

    The same numbers as `tracer.target_probs(...).mean_nll` (tested), computed with
    `tracer.batching`. CounterFact's ES/PS/NS compare these (ROME section 3.3 and Appendix).

    Args:
        model: a TransformerLens model with a tokenizer.
        prompts: `[n]` filled prompts.
        targets: `[n]` target texts, one per prompt.
        batch_size: pairs per forward pass.

    Returns:
        `[n]` mean negative log-likelihoods per target token, in nats.

    Raises:
        ValueError: `prompts` and `targets` differ in length, or a pair `encode` /
            `target_ids` refuse (empty, longer than `n_ctx`).

    Example:
        >>> target_nll(model, ["The Eiffel Tower is in"], ["Paris"])
    """
    from tracer.batching import log_probs, pick  # noqa: PLC0415

    out: list[float] = []
    for tf, logits in _teacher_forced(model, prompts, targets, batch_size):
        lp = pick(log_probs(logits), tf.targets).cpu()
        out += [float(-seg.mean()) for seg in tf.split(lp)]
    return out


def _teacher_forced(model, prompts: Sequence[str], targets: Sequence[str], batch_size: int):
    """Per batch of (prompt, target) pairs: their `tracer.batching.TeacherForced` layout and
    the logits at every position predicting a target token (`[m, vocab]`, in order).

    When the rows of a batch share at least `tracer.model.SHARED_PREFIX_MIN` leading tokens
    before their first scored position (a few-shot prompt), those are run once and the rows
    resume after them (`tracer.model.shared_prefix_run`); the same logits up to float rounding.
    Hooks active around it then see two passes: the prefix (one row) and the rest (every row,
    position 0 being the first token after the prefix).
    """
    from tracer import encode, target_ids  # noqa: PLC0415
    from tracer.batching import pad_tokens, teacher_forced  # noqa: PLC0415
    from tracer.model import (  # noqa: PLC0415
        SHARED_PREFIX_MIN, common_prefix, final_logits, model_device, resume_with_prefix, shared_prefix_run,
        unembed_positions)

    if len(prompts) != len(targets):
        raise ValueError(f"prompts and targets differ in length ({len(prompts)} vs {len(targets)})")
    device = model_device(model)
    pairs = [(encode(model, p), target_ids(model, p, t)) for p, t in zip(prompts, targets)]
    for b in range(0, len(pairs), batch_size):
        tf = teacher_forced(pairs[b : b + batch_size])
        rows, cols = tf.rows_tensor(device), tf.cols_tensor(device)
        shared = common_prefix(tf.seqs, cap=min(tf.cols))  # every scored position stays in the suffix
        cache = shared_prefix_run(model, tf.seqs[0][:shared]) if len(tf.seqs) > 1 and shared >= SHARED_PREFIX_MIN else None
        if cache is None:
            yield tf, unembed_positions(model, pad_tokens(model, tf.seqs, device), rows, cols)
            continue
        suffix = pad_tokens(model, [s[shared:] for s in tf.seqs], device)  # right-padded: unseen by real tokens
        zeros = torch.zeros(len(tf.seqs), dtype=torch.long, device=device)
        resid = resume_with_prefix(model, suffix, start_at_layer=None, cache=cache, rows=zeros, prefix=shared)
        dev = resid.device  # the last block's device (a model split over GPUs)
        yield tf, final_logits(model, resid[rows.to(dev), (cols - shared).to(dev)][:, None])[:, 0]


@torch.no_grad()
def greedy_generate(model, prompts: Sequence[str], max_new_tokens: int = 100) -> list[str]:
    """Greedy continuations of `prompts`; returns prompt + continuation, decoded.

    The prompts share one batch (`tracer.model.greedy_tokens`, with a key/value cache where
    the model has a usable one) and only each row's last position is unembedded.
    Generation stops early only at the model's context length.

    Args:
        model: a TransformerLens model with a tokenizer.
        prompts: the prompts (GE / RS generation prompts).
        max_new_tokens: greedy tokens added to each prompt (fewer where `n_ctx` ends first).

    Returns:
        One decoded text per prompt (prompt + continuation, special tokens dropped).

    Raises:
        ValueError: `max_new_tokens` < 0, or a prompt `encode` refuses (empty, longer than
            `n_ctx`).

    Example:
        >>> greedy_generate(model, ["The Eiffel Tower is in"], max_new_tokens=5)
    """
    from tracer import encode  # noqa: PLC0415
    from tracer.model import greedy_tokens  # noqa: PLC0415

    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens {max_new_tokens} must be >= 0")
    if not prompts:
        return []
    seqs = [encode(model, p) for p in prompts]
    n_ctx = int(getattr(model.cfg, "n_ctx", 2048) or 2048)
    steps = max(0, min(max_new_tokens, n_ctx - max(len(s) for s in seqs)))
    new = greedy_tokens(model, seqs, steps)
    # skip_special_tokens drops the BOS (and any EOS the model generated)
    return [model.tokenizer.decode(s + c, skip_special_tokens=True) for s, c in zip(seqs, new)]


@torch.no_grad()
def teacher_forced_correct(model, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = 16) -> list[list[bool]]:
    """For each (prompt, target): per target token, is the argmax given prompt + previous target tokens that token?

    This is ROME's zsRE token accuracy (`eval_utils_zsre`), computed in one pass per
    pair instead of one prompt per prefix. Targets get a leading space as `tracer.target_ids` decides.
    The arguments are `target_nll`'s (`[n]` filled prompts, `[n]` target texts, pairs per pass).

    Returns:
        Per pair, one bool per target token.

    Raises:
        ValueError: `prompts` and `targets` differ in length, or a pair `encode` /
            `target_ids` refuse (empty, longer than `n_ctx`).

    Example:
        >>> teacher_forced_correct(model, ["The Eiffel Tower is in the city of"], ["Paris"])
        [[True]]
    """
    out: list[list[bool]] = []
    for tf, logits in _teacher_forced(model, prompts, targets, batch_size):
        hits = (logits.argmax(-1).cpu() == torch.tensor(tf.targets)).tolist()
        out += [[bool(h) for h in seg] for seg in tf.split(hits)]
    return out
