"""Second-moment statistics of MLP keys, C = E[k kᵀ], cached on disk.

ROME's update is `Λ (C⁻¹ k*)ᵀ` and MEMIT's is `R Kᵀ (λC + K Kᵀ)⁻¹`; both need the
uncentred second moment `C` of the keys `k` that `W_out` of a layer reads
(`blocks.{l}.mlp.hook_post`, `[d_mlp]`) over generic text. This module streams a corpus
through the model, stops each forward pass just after the deepest requested layer,
accumulates `Σ k kᵀ` in float64 and divides by the token count.

Corpora: a local text file (offline, e.g. WikiText-2 raw test) or, when online, a Hugging
Face dataset given as `"hf:wikitext/wikitext-103-raw-v1:train"` (the paper used Wikipedia /
WikiText-103). The text is tokenized, concatenated and cut into rows of `seq_len` tokens,
each prefixed with the model's BOS token; the BOS position is left out of the statistics
(it is an attention sink with outlier activations, and never a subject token).

Cache: `<cache_dir>/stats/<model>/<weights hash[:16]>/layer<l>_<corpus id>_<tokens>.safetensors`
holds `C` (float32 by default) and metadata: model id and full weights hash, layer, corpus id
and sha256, token count, dtype. A file whose metadata does not match the request, or which
cannot be read, is recomputed with a warning, never used.

Example:
    >>> from editor.stats import layer_stats
    >>> C = layer_stats(model, 6, corpus="../shared/data/wikitext-2-raw-test.txt", n_tokens=50_000)
    >>> C.shape
    torch.Size([2048, 2048])
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from editor.checks import check_layer, check_layers, check_positive_int, check_stats_tokens
from tracer.batching import pad_tokens
from tracer.files import atomic_path, safe_name
from tracer.hooks import hook_name
from tracer.model import bos_cache_tag, bos_ids, model_device, model_name, recording, run_until, weights_hash
from tracer.offline import cache_dir as default_cache_dir, cache_root

log = logging.getLogger(__name__)

STATS_VERSION = "1"


def _default_corpus() -> str:
    root = Path(os.environ.get("ROMELENS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    return str(root / "wikitext-2-raw-test.txt")


def _corpus_text(corpus: str) -> tuple[str, str, str]:
    """Return (text, corpus id, sha256) for a file path or an `hf:name/config:split` spec."""
    if corpus.startswith("hf:"):
        spec = corpus[3:]
        name, _, split = spec.partition(":")
        path, _, config = name.partition("/")
        from datasets import load_dataset  # noqa: PLC0415  (only when asked for)

        ds = load_dataset(path, config or None, split=split or "train")
        text = "\n".join(t for t in ds["text"] if t.strip())
        cid = safe_name(spec)
    else:
        p = Path(corpus)
        if not p.is_file():
            raise ValueError(
                f"corpus {corpus!r} is not a file; pass a text file (e.g. wikitext-2-raw-test.txt: "
                "corpus= in Python, --corpus on the command lines, or $ROMELENS_DATA for the folder "
                "holding it) or 'hf:wikitext/wikitext-103-raw-v1:train' when online"
            )
        text = p.read_text(encoding="utf-8")
        cid = safe_name(p.stem)
    return text, cid, hashlib.sha256(text.encode()).hexdigest()


def _tokenize(model, text: str, limit: int | None = None) -> list[int]:
    """The corpus as one token list (paragraphs joined by newlines, no special tokens).

    Tokenizes 256 paragraphs at a time and stops once `limit` tokens are there (None: all),
    so a small `n_tokens` over a large corpus does not tokenize all of it.
    """
    tok = model.tokenizer
    paragraphs = [p for p in text.split("\n") if p.strip()]
    ids: list[int] = []
    step = 256
    for i in range(0, len(paragraphs), step):
        if limit is not None and len(ids) >= limit:
            break
        ids.extend(tok("\n".join(paragraphs[i : i + step]) + "\n", add_special_tokens=False)["input_ids"])
    return ids


def _rows(model, ids: list[int], seq_len: int) -> Iterator[list[int]]:
    """Token rows of `seq_len` text tokens (BOS prepended when the model uses one)."""
    bos = bos_ids(model)
    for i in range(0, len(ids), seq_len):
        row = ids[i : i + seq_len]
        if len(row) == seq_len or len(row) > 8:
            yield bos + row


SHARD_BATCHES = 16  # batches per task when workers compute the statistics (`compute_stats(workers=...)`)


def _plan(model, text: str, n_tokens: int, seq_len: int, batch_size: int) -> list[list[list[int]]]:
    """The token rows of every forward pass, batch by batch, trimmed to `n_tokens` (BOS not counted).

    The same batches whether they are run here or by workers, so each batch's `k kᵀ` is the
    same computation either way.
    """
    has_bos = int(bool(bos_ids(model)))
    ids = _tokenize(model, text, limit=n_tokens + seq_len)  # + one row: every row that is used is whole
    rows = _rows(model, ids, seq_len)
    batches: list[list[list[int]]] = []
    count = 0
    while True:
        batch = list(itertools.islice(rows, batch_size))
        if not batch:
            break
        keep, used = [], 0  # keep only what is needed to reach n_tokens
        for r in batch:
            if used >= n_tokens - count:
                break
            take = min(len(r) - has_bos, n_tokens - count - used)
            keep.append(r[: take + has_bos])
            used += take
        batches.append(keep)
        count += used
        if count >= n_tokens or len(batch) < batch_size:
            break
    return batches


@torch.no_grad()
def _key_sums(model, layers: Sequence[int], batches: Sequence[Sequence[Sequence[int]]], *, early_stop: bool = True,
              bar=None) -> tuple[dict[int, Tensor], int]:
    """`({layer: Σ k kᵀ [d_mlp, d_mlp] float64}, tokens)` over `batches` (rows from `_plan`).

    Each batch's product is taken in float32, the running sum kept in float64.
    """
    has_bos = bool(bos_ids(model))
    device = model_device(model)
    d = model.cfg.d_mlp
    sums = {l: torch.zeros(d, d, dtype=torch.float64, device=device) for l in layers}
    names = {l: hook_name("key", l) for l in layers}
    count = 0
    for keep in batches:
        tokens = pad_tokens(model, keep, device)  # right-padded: causal, so the real keys are exact
        mask = torch.zeros(len(keep), tokens.shape[1] - int(has_bos), dtype=torch.bool, device=device)
        for i, r in enumerate(keep):
            mask[i, : len(r) - int(has_bos)] = True
        if early_stop:  # the pass ends at the deepest layer's keys; the others are recorded on the way
            with recording(model, [names[l] for l in layers[:-1]]) as seen:
                deepest = run_until(model, tokens, names[layers[-1]])
            seen = {**seen, names[layers[-1]]: deepest}
        else:  # the full model, unembedding included (for the speed benchmark)
            with recording(model, [names[l] for l in layers]) as seen:
                model(tokens)
        for l in layers:
            k = seen[names[l]][:, int(has_bos) :].float()  # drop BOS: [batch, pos, d_mlp]
            k = k[mask]  # [tokens, d_mlp], padding removed
            sums[l].add_((k.T @ k).double())  # per-batch product in fp32, running sum in fp64
        used = int(mask.sum())
        count += used
        if bar is not None:
            bar.update(used)
    return sums, count


def _shard_sums(model, task) -> tuple[dict[int, Tensor], int]:
    """A worker's task: `_key_sums` of one shard of batches, on the CPU (for `tracer.workers`)."""
    layers, batches, early_stop = task
    sums, count = _key_sums(model, layers, batches, early_stop=early_stop)
    return {l: s.cpu() for l, s in sums.items()}, count


@torch.no_grad()
def compute_stats(
    model,
    layers: Sequence[int],
    *,
    corpus: str | None = None,
    n_tokens: int = 100_000,
    seq_len: int = 256,
    batch_size: int = 8,
    early_stop: bool = True,
    progress: bool = True,
    min_tokens: int | None = None,
    workers=None,
    shard_batches: int = SHARD_BATCHES,
) -> tuple[dict[int, Tensor], int]:
    """Accumulate `E[k kᵀ]` of the keys at each of `layers` over a corpus, without a cache.

    The uncentred key second moment `C` of ROME Eq. 2 (Sec. 3.1: estimated over Wikipedia
    text) and MEMIT Eq. 14; keys `k` are `blocks.{l}.mlp.hook_post`, `[d_mlp]` per token.

    With `workers` (a `tracer.workers.WorkerPool` holding the same model) this is a
    map-reduce: the corpus is cut into the same batches as here, `shard_batches` batches
    per task; each worker returns its shard's float64 `Σ k kᵀ` and token count, and this
    process adds the shards in shard order (not completion order), so the result does not
    depend on scheduling nor on the number of workers. Each batch's float32 product is the
    same computation as without workers; only the float64 additions are grouped by shard,
    so the result agrees with the single-process one to float64 rounding (relative 1e-12)
    when the workers run on the same device type with the same thread count, and within
    float32 rounding of each batch product otherwise (relative 1e-6 of the largest entry).

    Args:
        model: a TransformerLens model with a tokenizer.
        layers: block indices.
        corpus: text file path or `hf:` spec; default `../shared/data/wikitext-2-raw-test.txt`.
        n_tokens: stop after this many (non-BOS) tokens; the whole corpus if smaller.
        seq_len: text tokens per row (capped at `n_ctx` minus the BOS).
        batch_size: rows per forward pass.
        early_stop: end each forward pass at the deepest layer's keys
            (`tracer.model.run_until`), the shallower layers' keys recorded on the way
            (`tracer.model.recording`); False runs the full model, kept for the speed benchmark.
        progress: show a tqdm bar.
        min_tokens: fewest tokens accepted, asked for and counted; default `d_mlp`, since
            `C` from fewer tokens is singular. 0 accepts any count (for inspection only).
        workers: a `tracer.workers.WorkerPool`, or None to compute here.
        shard_batches: batches per worker task (with `workers`).

    Returns:
        `({layer: C [d_mlp, d_mlp] float64}, tokens counted)`.

    Raises:
        ValueError: a bad layer (`check_layers`); `n_tokens` not an int >= 1 or below
            `min_tokens`, or `min_tokens` not an int >= 0 (before any forward pass); a
            corpus path that is not a file, gives no tokens or ends before `min_tokens`;
            non-finite keys (e.g. an overflowing half-precision model), naming the layer;
            `shard_batches` not an int >= 1; `workers` holding another model.
    """
    layers = sorted(set(check_layers(layers, "layers", model.cfg.n_layers)))
    check_positive_int(n_tokens, "n_tokens")
    check_positive_int(shard_batches, "shard_batches")
    min_tokens = _min_tokens(model, n_tokens, min_tokens)
    text, _, _ = _corpus_text(corpus or _default_corpus())
    if workers is not None:
        workers.check_model(model)
    has_bos = bool(bos_ids(model))
    seq_len = min(seq_len, model.cfg.n_ctx - int(has_bos))  # rows must fit the context window
    batches = _plan(model, text, n_tokens, seq_len, batch_size)
    total = sum(len(r) - int(has_bos) for b in batches for r in b)
    bar = tqdm(total=total, desc=f"key stats L{layers}", unit="tok", disable=not progress)
    if workers is None:
        sums, count = _key_sums(model, layers, batches, early_stop=early_stop, bar=bar)
    else:
        shards = [batches[i : i + shard_batches] for i in range(0, len(batches), shard_batches)]
        sums, count, arrived, nxt = None, 0, {}, 0
        for i, got in workers.map(_shard_sums, [(layers, sh, early_stop) for sh in shards]):
            arrived[i] = got
            bar.update(got[1])
            while nxt in arrived:  # add in shard order, whatever order they came in
                part, c = arrived.pop(nxt)
                sums = part if sums is None else {l: sums[l] + part[l] for l in layers}
                count += c
                nxt += 1
        device = model_device(model)
        d = model.cfg.d_mlp
        sums = {l: (torch.zeros(d, d, dtype=torch.float64) if sums is None else sums[l]).to(device) for l in layers}
    bar.close()
    if count == 0:
        raise ValueError(f"corpus {corpus!r} gave no tokens")
    if count < min_tokens:
        raise ValueError(
            f"corpus {corpus!r} ended after {count} tokens (asked for {n_tokens}), below min_tokens {min_tokens} "
            f"(default d_mlp {model.cfg.d_mlp}: key statistics from fewer tokens than d_mlp are singular). "
            "Use a longer corpus"
        )
    if count < n_tokens:
        log.info("corpus ended after %d tokens (asked for %d)", count, n_tokens)
    for l, s in sums.items():
        if not torch.isfinite(s).all():
            raise ValueError(
                f"key statistics at layer {l} are not finite (NaN or inf keys over corpus {corpus!r}); "
                "a half-precision model may overflow: compute them on a float32 model"
            )
    return {l: s / count for l, s in sums.items()}, count


def _min_tokens(model, n_tokens: int, min_tokens: int | None) -> int:
    """`min_tokens` resolved (None: d_mlp); refuses `n_tokens` below it before any work."""
    if min_tokens is None:
        check_stats_tokens(model, n_tokens, "n_tokens")
        return int(model.cfg.d_mlp)
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
        raise ValueError(f"min_tokens {min_tokens!r} must be an int >= 0 (None: d_mlp)")
    if n_tokens < min_tokens:
        raise ValueError(f"n_tokens {n_tokens} is below min_tokens {min_tokens}")
    return min_tokens


def _path(root: Path, name: str, whash: str, layer: int, cid: str, n_tokens: int, dtype: torch.dtype) -> Path:
    safe = safe_name(name)
    dt = str(dtype).replace("torch.", "")
    return root / "stats" / safe / whash[:16] / f"layer{layer}_{cid}_{n_tokens}_{dt}.safetensors"


def _atomic_save(tensors: dict[str, Tensor], meta: dict[str, str], path: Path) -> None:
    from safetensors.torch import save_file  # noqa: PLC0415

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)


def _load_checked(path: Path, expect: dict[str, str], min_tokens: int = 0) -> Tensor | None:
    """The cached C if the file reads, its metadata matches `expect` and it counted at least
    `min_tokens` tokens, else None (warned)."""
    if not path.exists():
        return None
    from safetensors import safe_open  # noqa: PLC0415

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            bad = {k: (meta.get(k), v) for k, v in expect.items() if meta.get(k) != v}
            if bad:
                log.warning("stats cache %s has mismatched metadata %s; recomputing", path, bad)
                return None
            if not meta.get("n_tokens", "").isdigit() or int(meta["n_tokens"]) < min_tokens:
                log.warning("stats cache %s counted %s tokens (< %d); recomputing", path, meta.get("n_tokens"), min_tokens)
                return None
            C = f.get_tensor("mom2")
    except Exception as err:  # corrupt / truncated file
        log.warning("stats cache %s is unreadable (%s); recomputing", path, err)
        return None
    d = int(expect["d_mlp"])
    if C.shape != (d, d) or not torch.isfinite(C).all():
        log.warning("stats cache %s holds a bad matrix %s; recomputing", path, tuple(C.shape))
        return None
    return C


def layer_stats(
    model,
    layers: int | Sequence[int],
    *,
    corpus: str | None = None,
    n_tokens: int = 100_000,
    cache_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    model_hash: str | None = None,
    seq_len: int = 256,
    batch_size: int = 8,
    progress: bool = True,
    min_tokens: int | None = None,
    workers=None,
    shard_batches: int = SHARD_BATCHES,
) -> Tensor | dict[int, Tensor]:
    """`C = E[k kᵀ]` at one layer (a Tensor) or several (a dict), from the cache or computed.

    The `C` of ROME Eq. 2 and MEMIT Eq. 14. Layers missing from the cache are computed
    together in one pass over the corpus.

    Args:
        model: a TransformerLens model with a tokenizer.
        layers: a block index or a list of them.
        corpus: text file or `hf:` spec (default: `../shared/data/wikitext-2-raw-test.txt`).
        n_tokens: tokens to accumulate (BOS positions not counted).
        cache_dir: cache root (default `tracer.offline.cache_dir()`); `"none"` disables caching.
        dtype: dtype stored and returned.
        model_hash: weights hash of the model the statistics describe (default: computed).
            Editors pass the hash of the unedited model so that stats survive edits.
        seq_len, batch_size, progress, min_tokens: see `compute_stats`. A cached file counted
            over fewer than `min_tokens` tokens is recomputed (with a warning).
        workers, shard_batches: compute the missing layers on a `tracer.workers.WorkerPool`
            holding the same model, as a map-reduce over shards of `shard_batches` batches
            (`compute_stats`). The cached file has the same name, format and metadata, and
            its `C` agrees with the single-process one within float rounding: relative
            1e-12 of the largest entry with the same device type and thread count in the
            workers (the float64 shard sums are only grouped differently; a float32 file
            then matches to its last bit or one ulp), 1e-6 otherwise.

    Returns:
        `[d_mlp, d_mlp]` on the model's device, or `{layer: C}` when `layers` is a list.

    Raises:
        ValueError: see `compute_stats` (layers, `n_tokens`, `min_tokens` and the corpus
            path are checked before the cache is read).

    Example:
        >>> C = layer_stats(model, 6, n_tokens=20_000, cache_dir="/tmp/romelens")
        >>> with WorkerPool(model="gemma-3-270m", workers=2) as pool:      # tracer.workers
        ...     C = layer_stats(model, [4, 5, 6], n_tokens=1_000_000, workers=pool)
    """
    n = model.cfg.n_layers
    single = not isinstance(layers, Sequence)
    wanted = [check_layer(layers, "layers", n)] if single else sorted(set(check_layers(layers, "layers", n)))
    check_positive_int(n_tokens, "n_tokens")
    min_tokens = _min_tokens(model, n_tokens, min_tokens)
    corpus = corpus or _default_corpus()
    _, cid, chash = _corpus_text(corpus)
    whash = model_hash or weights_hash(model)
    name = model_name(model)
    root = cache_root(cache_dir)
    use_cache = root is not None
    device = model_device(model)
    def meta_of(l: int) -> dict[str, str]:
        return {
            "version": STATS_VERSION,
            "model": name,
            "weights_hash": whash,
            "layer": str(l),
            "corpus": cid,
            "corpus_sha256": chash,
            "n_tokens_requested": str(n_tokens),
            "seq_len": str(seq_len),
            "dtype": str(dtype),
            "d_mlp": str(model.cfg.d_mlp),
        }

    out: dict[int, Tensor] = {}
    missing = []
    for l in wanted:
        expect = meta_of(l)
        C = _load_checked(_path(root, name + bos_cache_tag(model), whash, l, cid, n_tokens, dtype), expect, min_tokens) if use_cache else None
        if C is None:
            missing.append(l)
        else:
            out[l] = C.to(device=device, dtype=dtype)
    if missing:
        computed, count = compute_stats(
            model, missing, corpus=corpus, n_tokens=n_tokens, seq_len=seq_len, batch_size=batch_size,
            progress=progress, min_tokens=min_tokens, workers=workers, shard_batches=shard_batches,
        )
        for l, C in computed.items():
            out[l] = C.to(dtype)
            if use_cache:
                meta = {**meta_of(l), "n_tokens": str(count)}
                path = _path(root, name + bos_cache_tag(model), whash, l, cid, n_tokens, dtype)
                _atomic_save({"mom2": out[l]}, meta, path)
                log.info("saved key stats for layer %d (%d tokens) to %s", l, count, path)
    return out[wanted[0]] if single else {l: out[l] for l in wanted}


def stats_path(model, layer: int, *, corpus: str | None = None, n_tokens: int = 100_000,
               cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
               model_hash: str | None = None) -> Path:
    """Where `layer_stats` caches layer `layer` (for inspection and tests).

    Args:
        model, layer, corpus, n_tokens, cache_dir, dtype, model_hash: as in `layer_stats`.

    Returns:
        The `.safetensors` path (which may not exist yet).

    Raises:
        ValueError: a corpus path that is not a file.
    """
    _, cid, _ = _corpus_text(corpus or _default_corpus())
    root = default_cache_dir(cache_dir)
    return _path(root, model_name(model) + bos_cache_tag(model), model_hash or weights_hash(model), layer, cid, n_tokens, dtype)
