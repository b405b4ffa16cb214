"""GGUF conversion (`tracer.offline.convert_gguf`) on a tiny GGUF file written here.

The file is a tiny random GPT-2 with its byte-level BPE tokenizer, written with the `gguf`
package as llama.cpp lays GPT-2 out (fp32, head tied to the embedding, no `output.weight`).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.tracer.hf_tiny import tiny_gpt2, write_gpt2_gguf
from tracer import offline

pytest.importorskip("gguf")


@pytest.fixture
def tiny_gguf(tokenizer, tmp_path):
    # transformers reads a GGUF's context_length as GPT-2's n_ctx, so keep GPT-2's 1024 positions
    hf = tiny_gpt2(tokenizer, n_positions=1024)
    return hf, write_gpt2_gguf(hf, tokenizer, tmp_path / "tiny-gpt2.F32.gguf")


def test_convert_gguf_rebuilds_a_plain_model_of_the_files_architecture(tokenizer, tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf, path = tiny_gguf
    out = offline.convert_gguf(path, tmp_path / "plain", note="test\n")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    assert (out / "SOURCE").read_text() == "tiny-gpt2.F32.gguf\ntest\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # written beside, renamed
    plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert plain.lm_head.weight.data_ptr() == plain.transformer.wte.weight.data_ptr()  # tied again
    ids = torch.tensor([tokenizer("The Eiffel Tower is located in", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok("The Eiffel Tower", add_special_tokens=False)["input_ids"] == tokenizer("The Eiffel Tower", add_special_tokens=False)["input_ids"]


def test_converted_folder_loads_as_a_model(tiny_gguf, tmp_path):
    from tracer import load_model

    hf, path = tiny_gguf
    model = load_model(str(offline.convert_gguf(path, tmp_path / "plain")))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0].log_softmax(-1), hf(ids).logits[0].log_softmax(-1), rtol=1e-4, atol=1e-4)


def test_gemma_cache_is_one_use_of_the_generic_conversion(tiny_gguf, tmp_path, monkeypatch):
    """`converted_gemma_dir` keeps its cache path and files; the conversion itself is generic."""
    _, path = tiny_gguf
    sha = offline.file_sha256(path)
    monkeypatch.setattr(offline, "gguf_path", lambda: (path, sha))
    out = offline.converted_gemma_dir(tmp_path / "cache")
    assert out == tmp_path / "cache" / "gemma-3-270m" / sha[:16]
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert (out / "SOURCE").read_text() == f"{path.name}\nsha256 {sha}\n"
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    calls = []
    monkeypatch.setattr(offline, "convert_gguf", lambda *a, **k: calls.append(a))
    assert offline.converted_gemma_dir(tmp_path / "cache") == out and calls == []  # cached: not converted again


def test_a_failed_conversion_leaves_nothing(tiny_gguf, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    _, path = tiny_gguf

    def broken(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        offline.convert_gguf(path, tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    with pytest.raises(FileNotFoundError, match="not found"):
        offline.convert_gguf(tmp_path / "missing.gguf", tmp_path / "x")
