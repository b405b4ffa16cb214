"""General-capability check: perplexity on a fixed, bounded slice of WikiText-2 (test split).

The first `max_tokens` tokens of the text are cut into windows of `window` tokens; each
window gets the model's BOS and is scored with teacher forcing. Perplexity is
`exp(mean NLL)` over every predicted token. The logits are computed in blocks of
positions, so a 262k vocabulary does not need a `[pos, vocab]` tensor per window at once.

Example:
    >>> from benchmarks.perplexity import wikitext_perplexity
    >>> wikitext_perplexity(model, max_tokens=2048)      # ../shared/data/wikitext-2-raw-test.txt
    27.3

CLI: `python -m benchmarks.perplexity --model gemma-3-270m --tokens 4096`
"""

from __future__ import annotations

import argparse
import logging
import math
import os

import torch

log = logging.getLogger(__name__)


@torch.no_grad()
def perplexity(model, text: str, *, max_tokens: int = 4096, window: int = 256, block: int = 64) -> float:
    """Perplexity of `model` on the first `max_tokens` tokens of `text`.

    Args:
        model: a TransformerLens model with a tokenizer.
        text: the evaluation text.
        max_tokens: how many tokens of `text` to score (bounded for cost).
        window: tokens per forward pass (BOS is added in front of each window where the
            model uses one, `tracer.model.bos_ids`; without BOS a window's first token is
            context only).
        block: positions unembedded at once.

    Returns:
        `exp(mean next-token NLL)` over the scored tokens, NLL in nats (a perplexity >= 1).

    Raises:
        ValueError: `max_tokens` or `window` below 2, or `text` with fewer than 2 tokens.

    Example:
        >>> perplexity(model, "The Eiffel Tower is in Paris. " * 50, max_tokens=256)
    """
    from tracer.batching import log_probs, pick  # noqa: PLC0415
    from tracer.model import bos_ids, final_logits, final_resid, model_device  # noqa: PLC0415

    if max_tokens < 2:
        raise ValueError(f"max_tokens {max_tokens} must be >= 2")
    if window < 2:
        raise ValueError(f"window {window} must be >= 2")
    tok = model.tokenizer
    n_ctx = int(getattr(model.cfg, "n_ctx", window + 1) or window + 1)
    window = min(window, n_ctx - 1)
    ids = tok(text[: max_tokens * 12], add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"text has {len(ids)} tokens; need at least 2 to measure perplexity")
    bos = bos_ids(model)
    device = model_device(model)
    nll, count = 0.0, 0
    for s in range(0, len(ids), window):
        chunk = bos + ids[s : s + window]
        if len(chunk) < 2:
            continue
        tokens = torch.tensor([chunk], device=device)
        resid = final_resid(model, tokens)[0]  # [pos, d_model]
        for b in range(0, len(chunk) - 1, block):
            e = min(b + block, len(chunk) - 1)
            lp = log_probs(final_logits(model, resid[b:e]))  # [e-b, vocab]
            nll -= pick(lp, tokens[0, b + 1 : e + 1]).sum().item()  # each position predicts the next token
            count += e - b
    return math.exp(nll / count)


def wikitext_perplexity(model, path: str | os.PathLike | None = None, *, max_tokens: int = 4096, window: int = 256) -> float:
    """`perplexity` on WikiText-2 raw test text (`path`, or the shared data file).

    Args:
        model: a TransformerLens model with a tokenizer.
        path: a text file; None for the shared `wikitext-2-raw-test.txt`.
        max_tokens, window: as in `perplexity`.

    Returns:
        The perplexity, `exp(mean NLL in nats)`.

    Raises:
        ValueError: as in `perplexity`.
        FileNotFoundError: no text file at `path` (or in the shared data folder).
    """
    from benchmarks.data import load_text  # noqa: PLC0415

    return perplexity(model, load_text(path), max_tokens=max_tokens, window=window)


def main(argv=None) -> None:
    """Run `python -m benchmarks.perplexity`: print the WikiText-2 perplexity of `--model`.

    Args:
        argv: the arguments (`--model`, `--data`, `--tokens`, `--window`, `--device`); None
            reads `sys.argv`.

    Raises:
        SystemExit: bad arguments (argparse exits with status 2), e.g. a non-integer `--tokens`.
        ValueError: a model `load_model` refuses, or `--tokens` / `--window` below 2.
        FileNotFoundError: no text file at `--data` (or in the shared data folder).
    """
    parser = argparse.ArgumentParser(description="WikiText-2 perplexity of a model (bounded token count)")
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--data", default=None, help="text file (default: shared wikitext-2-raw-test.txt)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    from tracer import load_model  # noqa: PLC0415

    model = load_model(args.model, device=args.device)
    print(f"perplexity {wikitext_perplexity(model, args.data, max_tokens=args.tokens, window=args.window):.3f}")


if __name__ == "__main__":
    main()
