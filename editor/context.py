"""Context templates: short prefixes the model writes itself, used to average keys and losses.

ROME and MEMIT compute the key `k*` and optimise the value `v*` over the edit prompt
preceded by several generic prefixes, so that the edit holds in varied contexts rather
than only right after BOS. The prefixes are sampled from the model (top-k sampling with a
fixed seed) from a few short openers, cleaned of braces, and end with `". {}"` so the
request prompt follows. The bare `"{}"` always comes first.

Templates are deterministic for a given model, seed and lengths, and are cached on disk
as JSON under `<cache_dir>/context/<model>/<weights hash[:16]>.json` (an atomic write).

Example:
    >>> from editor.context import context_templates
    >>> context_templates(model, n=4, length=10)[:2]
    ['{}', 'The first time I saw the movie, I was. {}']
"""

from __future__ import annotations

import json
import logging
import os
import re

import torch

from tracer.batching import pad_tokens
from tracer.files import atomic_write_text, safe_name
from tracer.model import bos_ids, final_logits, final_resid, model_device, model_name, weights_hash
from tracer.offline import cache_root

log = logging.getLogger(__name__)

OPENERS: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def generate_templates(model, *, n: int = 10, length: int = 10, seed: int = 0, top_k: int = 5) -> list[str]:
    """Sample `n` prefixes of `length` tokens (top-k sampling, seeded) and make templates.

    Each prefix starts from an opener word, after BOS only where the model uses one
    (`tracer.model.bos_ids`); without BOS the opener's own tokens start the sequence, and
    the first sampled token is predicted from them.

    Args:
        model: a TransformerLens model with a tokenizer.
        n: prefixes sampled (openers cycle through `OPENERS`).
        length: tokens sampled after each opener.
        seed: seed of the sampling generator (a CPU generator; the draws are made on the CPU).
        top_k: each token is drawn from the `top_k` most probable, by their renormalised
            probabilities.

    Returns:
        `["{}"]` plus `n` templates `"<prefix>. {}"` (braces removed from the prefix).

    Raises:
        ValueError: `n` < 1 (no sequence to pad), or an opener plus `length` tokens longer
            than the model's context `n_ctx`.

    Example:
        >>> generate_templates(model, n=2, length=5)     # ['{}', '... . {}', '... . {}']
    """
    tok = model.tokenizer
    device = model_device(model)
    bos = bos_ids(model)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    openers = [OPENERS[i % len(OPENERS)] for i in range(n)]
    seqs = [bos + tok(o, add_special_tokens=False)["input_ids"] for o in openers]
    starts = [len(s) for s in seqs]
    for _ in range(length):
        tokens = pad_tokens(model, seqs, device)
        resid = final_resid(model, tokens)  # [n, pos, d_model]
        last = torch.tensor([len(s) - 1 for s in seqs], device=device)
        logits = final_logits(model, resid[torch.arange(len(seqs), device=device), last]).float().cpu()
        top = logits.topk(top_k, dim=-1)
        probs = top.values.softmax(-1)
        pick = torch.multinomial(probs, 1, generator=gen)[:, 0]
        for i, s in enumerate(seqs):
            s.append(int(top.indices[i, pick[i]]))
    out = ["{}"]
    for s, start in zip(seqs, starts):
        text = tok.decode(s[len(bos) :], skip_special_tokens=True)
        text = re.sub(r"\s+", " ", text.replace("{", " ").replace("}", " ")).strip()
        out.append(text + ". {}")
    return out


def context_templates(
    model,
    *,
    n: int = 10,
    length: int = 10,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    model_hash: str | None = None,
) -> list[str]:
    """`["{}"]` plus `n` self-generated templates `"<prefix>. {}"`, cached on disk.

    Args:
        model: a TransformerLens model with a tokenizer.
        n: generated templates (0 gives only the bare `"{}"`).
        length: tokens sampled per prefix.
        seed: sampling seed.
        cache_dir: cache root (default `tracer.offline.cache_dir()`); `"none"` disables.
        model_hash: weights hash keying the cache (default: computed).

    Returns:
        A list of `n + 1` templates, each with one `{}`.

    Raises:
        ValueError: `n` < 0, or a `length` too long for the model's context `n_ctx`
            (`generate_templates`). An unreadable or mismatched cache file is not an
            error: it is regenerated with a warning.

    Example:
        >>> context_templates(model, n=4, length=10, cache_dir="none")[0]
        '{}'
    """
    if n == 0:
        return ["{}"]
    whash = model_hash or weights_hash(model)
    root = cache_root(cache_dir)
    safe = safe_name(model_name(model))
    path = root / "context" / safe / f"{whash[:16]}.json" if root is not None else None
    key = f"n={n},length={length},seed={seed}" + ("" if bos_ids(model) else ",no-bos")  # templates differ with BOS
    table: dict = {}
    if path is not None and path.exists():
        try:
            table = json.loads(path.read_text())
            if table.get("weights_hash") != whash:
                log.warning("context cache %s is for other weights; regenerating", path)
                table = {}
            elif key in table.get("templates", {}):
                got = table["templates"][key]
                if isinstance(got, list) and len(got) == n + 1 and all(t.count("{}") == 1 for t in got):
                    return got
                log.warning("context cache %s entry %s is malformed; regenerating", path, key)
        except (OSError, ValueError) as err:
            log.warning("context cache %s is unreadable (%s); regenerating", path, err)
            table = {}
    templates = generate_templates(model, n=n, length=length, seed=seed)
    if path is not None:
        table = {"weights_hash": whash, "model": model_name(model), "templates": {**table.get("templates", {}), key: templates}}
        atomic_write_text(path, json.dumps(table, indent=1))
    return templates
