"""Tiny random Hugging Face models, model folders and GGUF files, built here (no downloads).

Used by the loading, BOS and conversion tests: a GPT-2 and a Llama architecture (the
Llama one stands in for a small chat model whose tokenizer adds no BOS), saved with
`save_pretrained` as a user's own fine-tuned folder would be, and a GPT-2 written as a
GGUF file with the `gguf` package the way llama.cpp's converter lays it out.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def tiny_gpt2(tokenizer, *, n_positions: int = 64, seed: int = 0):
    """A tiny random `GPT2LMHeadModel` (2 blocks, width 32) for `tokenizer`, eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(tokenizer, *, seed: int = 0):
    """A tiny random `LlamaForCausalLM` (2 blocks, width 32, grouped KV heads), eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


def save_folder(hf_model, tokenizer, path: Path) -> Path:
    """`save_pretrained` model and tokenizer into `path` (a user's local model folder)."""
    hf_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_gpt2_gguf(hf_model, tokenizer, path: Path) -> Path:
    """Write a GPT-2 `hf_model` as an fp32 GGUF file, with its byte-level BPE tokenizer.

    Tensor names come from `gguf`'s own name map (the one `transformers` reads with), the
    four matrices llama.cpp transposes for GPT-2 are transposed, and no `output.weight` is
    written: the head is tied to the embedding, as in GPT-2 GGUF files.
    """
    import gguf

    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_name("tiny-gpt2")
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.n_positions)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(4 * cfg.n_embd)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = [None] * len(tokenizer)
    for text, i in tokenizer.get_vocab().items():
        tokens[i] = text
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    special = set(tokenizer.all_special_tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, cfg.n_layer)
    transposed = ("attn_qkv.weight", "ffn_down.weight", "ffn_up.weight", "attn_output.weight")
    for name, t in hf_model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to the embedding
        base, suffix = name.rsplit(".", 1)
        g = f"{names.get_name(base)}.{suffix}"
        a = t.detach().float().numpy()
        if g.endswith(transposed):
            a = a.T
        w.add_tensor(g, a.copy(order="C"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
