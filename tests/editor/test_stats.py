"""Key statistics: correctness against a direct computation, cache round-trip, corruption."""

import logging

import pytest
import torch

from editor.stats import compute_stats, layer_stats, stats_path
from tracer.hooks import hook_name


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(["The Eiffel Tower is located in the city of Paris and the Louvre too."] * 40))
    return str(p)


def test_stats_match_direct_computation(tiny_model, corpus):
    C, n = compute_stats(tiny_model, [1], corpus=corpus, n_tokens=200, seq_len=20, batch_size=3, progress=False)
    assert n == 200
    # direct: same rows, full forward, keys without the BOS position
    from editor.stats import _rows, _tokenize

    rows = []
    for r in _rows(tiny_model, _tokenize(tiny_model, open(corpus).read()), 20):
        rows.append(r)
    keys, total = [], 0
    for r in rows:
        _, cache = tiny_model.run_with_cache(torch.tensor([r]), names_filter=hook_name("key", 1))
        k = cache[hook_name("key", 1)][0, 1:].double()
        k = k[: 200 - total]
        keys.append(k)
        total += len(k)
        if total >= 200:
            break
    K = torch.cat(keys)
    assert torch.allclose(C[1], K.T @ K / len(K), rtol=1e-5, atol=1e-7)


def test_several_layers_one_pass_and_early_stop_equal(tiny_model, corpus):
    a, _ = compute_stats(tiny_model, [0, 2], corpus=corpus, n_tokens=200, progress=False)
    b, _ = compute_stats(tiny_model, [0, 2], corpus=corpus, n_tokens=200, early_stop=False, progress=False)
    for l in (0, 2):
        assert torch.allclose(a[l], b[l])
    assert not torch.allclose(a[0], a[2])


def test_early_stop_runs_nothing_after_the_deepest_layer(tiny_model, corpus):
    """With early_stop the pass ends at the deepest requested layer's keys; without, the model runs to the end."""
    calls = []
    with tiny_model.hooks(fwd_hooks=[(hook_name("key", 2), lambda act, hook: calls.append(1))]):
        compute_stats(tiny_model, [1, 0], corpus=corpus, n_tokens=100, seq_len=20, batch_size=2, progress=False, min_tokens=0)
        assert calls == []
        compute_stats(tiny_model, [1, 0], corpus=corpus, n_tokens=100, seq_len=20, batch_size=2, early_stop=False, progress=False, min_tokens=0)
        assert len(calls) == 3  # 100 tokens in rows of 20, two rows a pass


def test_cache_round_trip_and_corruption(tiny_model, corpus, tmp_path, caplog):
    cache = tmp_path / "cache"
    C1 = layer_stats(tiny_model, 1, corpus=corpus, n_tokens=150, cache_dir=cache, progress=False)
    path = stats_path(tiny_model, 1, corpus=corpus, n_tokens=150, cache_dir=cache)
    assert path.exists()
    mtime = path.stat().st_mtime_ns
    C2 = layer_stats(tiny_model, 1, corpus=corpus, n_tokens=150, cache_dir=cache, progress=False)
    assert torch.equal(C1, C2)
    assert path.stat().st_mtime_ns == mtime  # read, not recomputed
    path.write_bytes(path.read_bytes()[:100])  # truncate: corrupt
    with caplog.at_level(logging.WARNING, logger="editor.stats"):
        C3 = layer_stats(tiny_model, 1, corpus=corpus, n_tokens=150, cache_dir=cache, progress=False)
    assert "unreadable" in caplog.text
    assert torch.equal(C1, C3)
    assert path.stat().st_size > 1000  # rewritten


def test_default_cache_dir_caches_and_none_disables(tiny_model, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("ROMELENS_CACHE", str(tmp_path / "default"))
    layer_stats(tiny_model, 1, corpus=corpus, n_tokens=200, progress=False)  # cache_dir=None: the default root
    path = stats_path(tiny_model, 1, corpus=corpus, n_tokens=200)
    assert path.exists() and str(path).startswith(str(tmp_path / "default"))
    layer_stats(tiny_model, 2, corpus=corpus, n_tokens=200, cache_dir="none", progress=False)
    assert not stats_path(tiny_model, 2, corpus=corpus, n_tokens=200).exists()


def test_cache_metadata_mismatch_is_recomputed(tiny_model, corpus, tmp_path, caplog):
    from safetensors.torch import save_file

    cache = tmp_path / "cache"
    C1 = layer_stats(tiny_model, 1, corpus=corpus, n_tokens=150, cache_dir=cache, progress=False)
    path = stats_path(tiny_model, 1, corpus=corpus, n_tokens=150, cache_dir=cache)
    save_file({"mom2": torch.zeros_like(C1)}, str(path), metadata={"layer": "1"})  # wrong metadata
    with caplog.at_level(logging.WARNING, logger="editor.stats"):
        C2 = layer_stats(tiny_model, 1, corpus=corpus, n_tokens=150, cache_dir=cache, progress=False)
    assert "mismatched" in caplog.text
    assert torch.equal(C1, C2)


def test_bad_arguments(tiny_model, corpus):
    with pytest.raises(ValueError, match="corpus"):
        compute_stats(tiny_model, [0], corpus="/no/such/file.txt", progress=False)
    with pytest.raises(ValueError, match="layers"):
        compute_stats(tiny_model, [7], corpus=corpus, progress=False)


def test_bos_and_no_bos_never_share_a_cache(tiny_model, corpus, tmp_path):
    """Statistics and the edit-layer choice depend on whether sequences start with BOS; the
    same weights loaded both ways must not read each other's files."""
    from tracer.layer import edit_layer_path
    from tracer.model import bos_ids, set_prepend_bos

    assert bos_ids(tiny_model)  # the tiny model starts with BOS
    with_bos = stats_path(tiny_model, 1, corpus=corpus, n_tokens=200, cache_dir=tmp_path)
    layer_with = edit_layer_path(tiny_model, cache_dir=tmp_path)
    C_bos = layer_stats(tiny_model, 1, corpus=corpus, n_tokens=200, cache_dir=tmp_path, progress=False)
    set_prepend_bos(tiny_model, False)
    without = stats_path(tiny_model, 1, corpus=corpus, n_tokens=200, cache_dir=tmp_path)
    assert without != with_bos and edit_layer_path(tiny_model, cache_dir=tmp_path) != layer_with
    C_plain = layer_stats(tiny_model, 1, corpus=corpus, n_tokens=200, cache_dir=tmp_path, progress=False)
    assert not torch.equal(C_bos, C_plain)  # recomputed without BOS, not read from the BOS file
    assert with_bos.exists() and without.exists()
