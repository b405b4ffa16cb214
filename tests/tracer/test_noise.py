"""Noise scale: embedding statistics, the explicit cache, and NoiseScale."""

from __future__ import annotations

import json

import pytest

from tracer.noise import BUILTIN_SUBJECTS, NoiseCache, NoiseScale, embedding_stats, reference_subjects, resolve_noise


def test_builtin_reference_has_about_fifty_subjects():
    subjects, ref = reference_subjects(None)
    assert ref == "builtin" and len(subjects) == len(BUILTIN_SUBJECTS) == 50


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
