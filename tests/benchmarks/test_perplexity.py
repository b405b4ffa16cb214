"""Perplexity against a direct full-logit computation."""

import math

import pytest
import torch

from benchmarks.perplexity import perplexity


def test_perplexity_matches_full_logits(tiny_model):
    text = "The Eiffel Tower is located in the city of Paris. Tokyo is the capital of Japan."
    ids = tiny_model.tokenizer(text, add_special_tokens=False)["input_ids"][:12]
    bos = tiny_model.tokenizer.bos_token_id
    nll, n = 0.0, 0
    for chunk in (ids[:5], ids[5:10], ids[10:12]):
        toks = torch.tensor([[bos, *chunk]])
        lp = tiny_model(toks)[0].log_softmax(-1)
        nll -= lp[torch.arange(len(chunk)), toks[0, 1:]].sum().item()
        n += len(chunk)
    assert perplexity(tiny_model, text, max_tokens=12, window=5, block=3) == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_perplexity_bad_arguments(tiny_model):
    with pytest.raises(ValueError, match="max_tokens 1"):
        perplexity(tiny_model, "abc", max_tokens=1)
