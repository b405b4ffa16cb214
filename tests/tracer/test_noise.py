"""Noise scale: embedding statistics, the explicit cache, and NoiseScale."""

from __future__ import annotations

import json

import pytest

from tracer.noise import BUILTIN_SUBJECTS, NoiseCache, NoiseScale, embedding_stats, reference_subjects, resolve_noise


def test_default_reference_is_the_builtin_list_and_a_copy(tiny_model, monkeypatch):
    # without a known_1000 path, the noise std is measured over BUILTIN_SUBJECTS, in order
    subjects, ref = reference_subjects(None)
    assert ref == "builtin" and subjects == list(BUILTIN_SUBJECTS)
    subjects.append("Tokyo")  # the caller's list is its own: the next call is unchanged
    assert reference_subjects(None)[0] == list(BUILTIN_SUBJECTS)
    seen = []
    real = embedding_stats

    def spy(model, subjects, **kwargs):
        seen.append(list(subjects))
        return real(model, subjects, **kwargs)

    monkeypatch.setattr("tracer.noise.embedding_stats", spy)
    stats = NoiseCache(use_disk=False).get(tiny_model)
    assert seen == [list(BUILTIN_SUBJECTS)] and stats.reference == "builtin"
    assert stats == real(tiny_model, BUILTIN_SUBJECTS, reference="builtin")


def test_reference_from_file_and_bad_file(tmp_path):
    p = tmp_path / "k.json"
    p.write_text(json.dumps([{"subject": "Eiffel Tower"}, {"subject": "Tokyo"}]))
    subjects, ref = reference_subjects(p)
    assert subjects == ["Eiffel Tower", "Tokyo"] and ref.startswith("file:")
    with pytest.raises(ValueError, match="not a file"):
        reference_subjects(tmp_path / "missing.json")


def test_embedding_stats_measure_first_block_input(tiny_model):
    stats = embedding_stats(tiny_model, ["Eiffel Tower", "Tokyo", "Paris"])
    assert stats.std > 0 and stats.n_tokens >= 3
    # GPT-2-style: resid_pre = embed + positional embedding, uncorrelated: slope near 1
    assert 0.5 < stats.embed_to_resid < 1.5
    assert stats.noise_std(3.0) == pytest.approx(3.0 * stats.std / stats.embed_to_resid)


def test_noise_cache_computes_once_and_persists(tiny_model, tmp_path):
    cache = NoiseCache(root=tmp_path)
    a = cache.get(tiny_model)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and "builtin" in files[0].name
    b = NoiseCache(root=tmp_path).get(tiny_model)  # a fresh cache reads the file back
    assert a == b
    assert resolve_noise(tiny_model, 2.0, cache=cache) == pytest.approx(a.noise_std(2.0))


def test_noise_scale_is_taken_as_is_and_validated(tiny_model):
    assert resolve_noise(tiny_model, NoiseScale(value=0.25)) == 0.25
    with pytest.raises(ValueError, match="NoiseScale value -1"):
        NoiseScale(value=-1)
    with pytest.raises(ValueError, match="noise 'big'"):
        resolve_noise(tiny_model, "big")


def _other_tiny_model(tokenizer, seed):
    from tests.conftest import make_tiny_bridge, make_tiny_hooked
    from tracer.model import TL_API, prepare_model

    return prepare_model(make_tiny_hooked(tokenizer, seed=seed) if TL_API == 3 else make_tiny_bridge(tokenizer, seed=seed)[0])


def test_noise_cache_memory_is_keyed_on_the_weights_not_the_object_id(tokenizer, monkeypatch):
    # a freed model's id can be reused by a new one: the cache must not hand the new model
    # the old model's statistics. Simulate the reuse by giving every model the same id.
    monkeypatch.setattr("tracer.noise.id", lambda obj: 12345, raising=False)
    first, second = _other_tiny_model(tokenizer, 1), _other_tiny_model(tokenizer, 2)
    cache = NoiseCache(use_disk=False)
    a, b = cache.get(first), cache.get(second)
    assert a == embedding_stats(first, BUILTIN_SUBJECTS, reference="builtin")
    assert b == embedding_stats(second, BUILTIN_SUBJECTS, reference="builtin")
    assert a.std != b.std
    assert cache.get(first) is a  # and each is still served from memory


def test_noise_cache_memory_follows_in_place_embedding_changes(tokenizer, monkeypatch):
    model = _other_tiny_model(tokenizer, 1)
    cache = NoiseCache(use_disk=False)
    calls = []
    real = embedding_stats
    monkeypatch.setattr("tracer.noise.embedding_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    before = cache.get(model)
    assert cache.get(model) is before and len(calls) == 1  # still cached in memory
    import torch

    with torch.no_grad():
        model.embed.W_E.mul_(2.0)  # same object, new embedding weights
    after = cache.get(model)
    assert len(calls) == 2 and after.std > before.std
    assert after == real(model, BUILTIN_SUBJECTS, reference="builtin")
