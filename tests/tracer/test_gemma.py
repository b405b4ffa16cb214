"""Integration: the real offline default model (Gemma-3-270m) on the installed TransformerLens.

Cross-API parity: each TransformerLens version's run writes its next-token distribution to
`$ROMELENS_PARITY_DIR` (set by `scripts/test.sh`); the run that finds the other version's
file compares the two within 1e-4. Each run also compares with plain `transformers`, so
a single run already bounds the API gap.
"""

import os
from pathlib import Path

import pytest
import torch

from tracer import locate_subject, target_probs
from tracer.model import TL_API

pytestmark = pytest.mark.integration

PROMPT = "The Eiffel Tower is located in the city of"


def _next_token_probs(model):
    tokens = locate_subject(model, PROMPT, "Eiffel Tower").tensor()
    with torch.no_grad():
        return model(tokens)[0, -1].float().softmax(-1)


def test_eiffel_tower_is_in_paris(gemma):
    probs = _next_token_probs(gemma)
    top = probs.argmax().item()
    assert gemma.tokenizer.decode([top]) == " Paris"
    assert probs[top] > 0.5
    assert target_probs(gemma, [PROMPT], ["Paris"]).first.item() == pytest.approx(probs[top].item(), abs=1e-5)


def test_matches_plain_transformers(gemma):
    from tracer.offline import load_gemma_hf

    hf, tok = load_gemma_hf()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert ids[0].tolist() == list(locate_subject(gemma, PROMPT, "Eiffel Tower").ids)
    with torch.no_grad():
        ref = hf(ids).logits[0, -1].float().softmax(-1)
    assert (ref - _next_token_probs(gemma)).abs().max().item() < 5e-5


def test_both_transformerlens_apis_agree(gemma):
    folder = os.environ.get("ROMELENS_PARITY_DIR")
    if not folder:
        pytest.skip("set ROMELENS_PARITY_DIR (scripts/test.sh does) to compare TL 3.x with 4.x")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mine = _next_token_probs(gemma)
    torch.save(mine, folder / f"gemma_next_token_tl{TL_API}.pt")
    other = folder / f"gemma_next_token_tl{7 - TL_API}.pt"
    if not other.exists():
        pytest.skip(f"no distribution from TransformerLens {7 - TL_API}.x yet in {folder}")
    assert (torch.load(other) - mine).abs().max().item() < 1e-4
