"""Noise scale for causal tracing: how much Gaussian noise corrupts the subject.

The paper adds noise with standard deviation `3 * sigma` to the subject's token embeddings,
where `sigma` is the standard deviation of the embeddings of a reference set of subjects.
We measure `sigma` on what the model *feeds its first block* (`blocks.0.hook_resid_pre`),
since some models scale the embedding on its way in (Gemma multiplies by `sqrt(d_model)`
in some TransformerLens versions, and in others the scale is already folded into `W_E`).
Noise is added at `hook_embed`, so the resid-pre standard deviation is converted to
hook_embed units by the least-squares slope `resid_pre ~ slope * embed` measured on the
same tokens (1 when the two hooks carry the same tensor, `sqrt(d_model)` when the model
scales the embedding, close to 1 for GPT-2, whose positional embedding is uncorrelated).

The reference set is the subjects of `known_1000.json` when a path is given, else the
built-in `BUILTIN_SUBJECTS` (50 named entities). The statistics are computed once per model
and kept by an explicit `NoiseCache`: in memory for its own lifetime and on disk as a small
JSON file under `tracer.offline.cache_dir()/noise/`, keyed by the model name, a sha256 of its
embedding weights, and the reference set.

Example:
    >>> from tracer import load_model
    >>> from tracer.noise import NoiseCache, resolve_noise
    >>> model = load_model("gemma-3-270m")
    >>> cache = NoiseCache()
    >>> std = resolve_noise(model, 3.0, cache=cache)   # noise std in hook_embed units
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from tracer.batching import pad_tokens
from tracer.files import atomic_write_text, safe_name
from tracer.hooks import EMBED, hook_name
from tracer.model import embedding_weights, model_device, model_name, recording, run_until
from tracer.offline import cache_dir
from tracer.prompts import locate_subject

log = logging.getLogger(__name__)

#: Reference subjects used when no `known_1000.json` is given: 50 well-known entities
#: (people, places, organisations, works, products), mixed single and multi-token.
BUILTIN_SUBJECTS: tuple[str, ...] = (
    "Eiffel Tower", "Barack Obama", "Microsoft", "Mount Everest", "Leonardo da Vinci",
    "Toyota", "Amazon River", "Albert Einstein", "The Beatles", "Harvard University",
    "Nintendo", "Statue of Liberty", "William Shakespeare", "Google", "Great Wall of China",
    "Lionel Messi", "Coca-Cola", "Sahara Desert", "Marie Curie", "BBC",
    "Taj Mahal", "Pablo Picasso", "Volkswagen", "Lake Victoria", "Isaac Newton",
    "Real Madrid", "Nokia", "Golden Gate Bridge", "Mahatma Gandhi", "Samsung",
    "Danube", "Wolfgang Amadeus Mozart", "IKEA", "Kilimanjaro", "Charles Darwin",
    "Manchester United", "Sony", "Colosseum", "Frida Kahlo", "Airbus",
    "Mississippi River", "Napoleon Bonaparte", "Adidas", "Sydney Opera House", "Ludwig van Beethoven",
    "Boeing", "Louvre", "Cristiano Ronaldo", "Ferrari", "Nelson Mandela",
)


@dataclass(frozen=True, kw_only=True)
class NoiseScale:
    """An explicit noise standard deviation, in `hook_embed` units.

    The `ν` of the corrupted run (ROME section 2.1: `ε ~ N(0; ν)` added to the subject's
    token embeddings), given directly instead of as a multiple of the measured std.

    Attributes:
        value: standard deviation of the Gaussian noise added to each subject-token
            embedding at `hook_embed`; must be >= 0.

    Raises:
        ValueError: `value` is negative or NaN.
        TypeError: `value` cannot be compared with 0 (e.g. None or a string).

    Example:
        >>> NoiseScale(value=0.1)
    """

    value: float

    def __post_init__(self):
        if not self.value >= 0:
            raise ValueError(f"NoiseScale value {self.value!r} must be a number >= 0")


@dataclass(frozen=True, kw_only=True)
class EmbeddingStats:
    """Statistics of the embeddings a model feeds its first block, over reference subjects.

    Attributes:
        std: standard deviation of `blocks.0.hook_resid_pre` over all subject tokens.
        embed_to_resid: least-squares slope of `resid_pre` on `hook_embed` over those tokens.
        n_tokens: number of subject tokens measured.
        reference: which reference set ("builtin" or "file:<sha256 prefix>").
    """

    std: float
    embed_to_resid: float
    n_tokens: int
    reference: str

    def noise_std(self, multiplier: float) -> float:
        """Noise std in hook_embed units for `multiplier * std` at the first block's input."""
        return float(multiplier) * self.std / self.embed_to_resid


def reference_subjects(path: str | os.PathLike | None = None) -> tuple[list[str], str]:
    """Reference subjects and an id for caching: from a known_1000-style JSON file, or built in.

    Args:
        path: a JSON list of objects with a "subject" field, or None for `BUILTIN_SUBJECTS`.

    Returns:
        `(subjects, reference_id)`: `reference_id` is `"builtin"`, or `"file:"` and the first
        16 hex digits of the file's sha256.

    Raises:
        ValueError: `path` is not a file, not a JSON list of objects with `"subject"`, or
            holds no subject.

    Example:
        >>> reference_subjects()[1]
        'builtin'
    """
    if path is None:
        return list(BUILTIN_SUBJECTS), "builtin"
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"noise reference {str(path)!r} is not a file; expected known_1000.json")
    raw = p.read_bytes()
    try:
        subjects = [str(r["subject"]) for r in json.loads(raw)]
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"noise reference {str(path)!r} is not a JSON list of objects with 'subject'") from e
    if not subjects:
        raise ValueError(f"noise reference {str(path)!r} holds no subjects")
    return subjects, "file:" + hashlib.sha256(raw).hexdigest()[:16]


@torch.no_grad()
def embedding_stats(model, subjects: Sequence[str], *, reference: str = "custom", batch_size: int = 64) -> EmbeddingStats:
    """Measure the embedding statistics over `subjects` (each tokenized alone, BOS excluded).

    Args:
        model: a TransformerLens model with a tokenizer.
        subjects: subject strings.
        reference: a label stored in the result.
        batch_size: subjects per forward pass (each pass stops after the embedding).

    Returns:
        An `EmbeddingStats`: the std of `blocks.0.hook_resid_pre` over the subject tokens
        (the `σ` whose multiple ROME section 2.1 uses as noise), in residual-stream units,
        and the `hook_embed` to `resid_pre` slope.

    Raises:
        ValueError: `batch_size` < 1, a subject `locate_subject` refuses (empty, longer than
            `n_ctx`), or subjects that give no token at all.

    Example:
        >>> embedding_stats(model, ["Eiffel Tower", "Barack Obama"]).std
    """
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be >= 1")
    device = model_device(model)
    first = hook_name("resid_pre", 0)
    seqs = []
    for s in subjects:
        pt = locate_subject(model, s, s)
        seqs.append((list(pt.ids), pt.subject[0]))
    embs, pres = [], []
    for b in range(0, len(seqs), batch_size):
        chunk = seqs[b : b + batch_size]
        tokens = pad_tokens(model, [s for s, _ in chunk], device)  # right-padded: the pad is masked out below
        mask = torch.zeros(tokens.shape, dtype=torch.bool, device=device)
        for i, (s, n_bos) in enumerate(chunk):
            mask[i, n_bos : len(s)] = True
        with recording(model, [EMBED]) as seen:
            pre = run_until(model, tokens, first)  # the pass ends at the first block's input
        embs.append(seen[EMBED][mask].float().cpu())  # [m, d_model]
        pres.append(pre[mask].float().cpu())
    e, r = torch.cat(embs), torch.cat(pres)
    if e.shape[0] == 0:
        raise ValueError("subjects produced no tokens to measure")
    slope = float((e * r).sum() / (e * e).sum())
    return EmbeddingStats(std=float(r.std()), embed_to_resid=slope, n_tokens=int(e.shape[0]), reference=reference)


def embedding_hash(model) -> str:
    """sha256 (hex) over the model's embedding weights (the only weights the stats depend on)."""
    h = hashlib.sha256()
    for _, p in embedding_weights(model):
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def embedding_fingerprint(model) -> str:
    """A fast fingerprint of the embedding weights, for `NoiseCache`'s in-memory key.

    Hashing every byte (`embedding_hash`) of Gemma-3's 262,144-row embedding takes seconds,
    too slow for every `trace_prompt` call (this takes about 0.1 s there). It hashes each
    token/position embedding's name, shape, an exact integer sum of its bits and 4,096
    evenly spaced entries (as `tracer.model.weights_hash` does for whole models): a
    different model, or any change to its embedding, changes it.
    """
    h = hashlib.sha256()
    for name, p in embedding_weights(model):
        if "unembed" in name:  # the statistics never read the unembedding
            continue
        flat = p.detach().float().reshape(-1).contiguous()
        idx = torch.linspace(0, flat.numel() - 1, min(4096, flat.numel()), dtype=torch.float64, device=flat.device).long()
        # exact and order-free: int64 sums wrap modulo 2**64; pairs of float32 words read as
        # one int64 sum 20x faster than widening each int32
        words = flat.view(torch.int64) if flat.numel() % 2 == 0 else flat.view(torch.int32).long()
        h.update(f"{name}{tuple(p.shape)}{int(words.sum())}".encode())
        h.update(flat[idx].cpu().numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True, kw_only=True)
class NoiseCache:
    """Computes embedding statistics once per model and keeps them in memory and on disk.

    Both caches are keyed on the embedding weights (in memory a fast fingerprint, on disk
    their sha256), the model name and the reference set, never on the model object, so a
    new model, or one whose embedding changed, is measured afresh.

    Attributes:
        root: folder for the JSON files; None means `tracer.offline.cache_dir() / "noise"`.
        use_disk: read and write the JSON files (False keeps the cache in memory only).

    Example:
        >>> cache = NoiseCache()
        >>> stats = cache.get(model)              # computed once, then read back
    """

    root: str | os.PathLike | None = None
    use_disk: bool = True
    _memory: dict = field(default_factory=dict, repr=False, compare=False)

    def folder(self) -> Path:
        """The folder of the JSON files: `root`, or `tracer.offline.cache_dir() / "noise"`."""
        return Path(self.root) if self.root is not None else cache_dir() / "noise"

    def get(self, model, reference: str | os.PathLike | None = None) -> EmbeddingStats:
        """Statistics for `model` over the reference subjects (`known_1000.json` path or None).

        Read from memory, else from the JSON file (an unreadable one is remeasured with a
        warning), else measured (`embedding_stats`) and written.

        Raises:
            ValueError: a `reference` that `reference_subjects` refuses, or from
                `embedding_stats`.
        """
        subjects, ref_id = reference_subjects(reference)
        # keyed on the weights, not id(model): a freed model's id can be reused by another
        mem_key = (model_name(model), embedding_fingerprint(model), ref_id)
        if mem_key in self._memory:
            return self._memory[mem_key]
        name = safe_name(model_name(model), "_")
        key = f"{name}-{embedding_hash(model)[:16]}-{ref_id.replace(':', '-')}"
        path = self.folder() / f"{key}.json"
        stats = None
        if self.use_disk and path.is_file():
            try:
                stats = EmbeddingStats(**json.loads(path.read_text()))
            except (ValueError, TypeError) as e:
                log.warning("ignoring unreadable noise cache %s: %s", path, e)
        if stats is None:
            log.info("measuring embedding std over %d reference subjects (%s)", len(subjects), ref_id)
            stats = embedding_stats(model, subjects, reference=ref_id)
            if self.use_disk:
                atomic_write_text(path, json.dumps(stats.__dict__))
        self._memory[mem_key] = stats
        return stats


def resolve_noise(
    model,
    noise: float | NoiseScale,
    *,
    reference: str | os.PathLike | None = None,
    cache: NoiseCache | None = None,
) -> float:
    """Noise standard deviation in hook_embed units.

    Args:
        model: the model.
        noise: a multiplier of the measured embedding std (the paper's 3.0), or a `NoiseScale`.
        reference: `known_1000.json` path for the reference subjects, or None for the built-in list.
        cache: a `NoiseCache`; None makes a fresh one (disk cache still applies).

    Returns:
        The std to pass to the Gaussian noise at `hook_embed`, in `hook_embed` units:
        `noise * σ / slope` (ROME section 2.1 uses `3σ`), or `noise.value` for a `NoiseScale`.

    Raises:
        ValueError: `noise` a bool, not a number or below 0 (or NaN), or a `reference`
            `reference_subjects` refuses.

    Example:
        >>> resolve_noise(model, 3.0, cache=NoiseCache(use_disk=False))
    """
    if isinstance(noise, NoiseScale):
        return float(noise.value)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise ValueError(f"noise {noise!r} must be a multiplier >= 0 or a NoiseScale")
    stats = (cache or NoiseCache()).get(model, reference)
    return stats.noise_std(noise)
