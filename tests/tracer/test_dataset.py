"""trace_dataset, token groups, confidence intervals, resume, and choose_edit_layer."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tracer.dataset import GROUPS, Fact, group_effects, known_mask, load_facts, mean_ci, trace_dataset
from tracer.layer import LayerChoice, choose_edit_layer, choose_from_result
from tracer.noise import NoiseScale
from tracer.result import TraceResult

NOISE = NoiseScale(value=3.0)
FACTS = [
    {"known_id": 0, "prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower", "attribute": None},
    {"known_id": 1, "prompt": "The Colosseum is located in the city of", "subject": "Colosseum", "attribute": None},
    {"known_id": 2, "prompt": "Tokyo is the capital of", "subject": "Tokyo", "attribute": None},
]


def _res(scores, subject, low=0.0):
    n_pos = scores.shape[0]
    return TraceResult(
        scores=scores, low=low, high=1.0, prompt="p", tokens=tuple(str(i) for i in range(n_pos)), subject=subject,
        target="x", target_id=0, kind="mlp", window=1, samples=1, noise_std=1.0,
    )


def test_group_effects_pick_the_paper_token_groups():
    # rows: 0 BOS, 1-4 subject, 5 first subsequent, 6-7 further, 8 last
    scores = torch.arange(9, dtype=torch.float32)[:, None].repeat(1, 2)
    g = group_effects(_res(scores, (1, 5), low=1.0))
    expect = {"first_subject": 0.0, "middle_subject": 1.5, "last_subject": 3.0, "first_subsequent": 4.0, "further": 5.5, "last": 7.0}
    for i, name in enumerate(GROUPS):
        assert torch.allclose(g[i], torch.full((2,), expect[name])), name


def test_group_effects_empty_groups_are_nan():
    scores = torch.rand(4, 3)
    g = group_effects(_res(scores, (1, 2)))  # one-token subject, then the last token directly... plus one
    assert torch.isnan(g[GROUPS.index("middle_subject")]).all()
    assert torch.allclose(g[GROUPS.index("first_subject")], g[GROUPS.index("last_subject")])
    g2 = group_effects(_res(torch.rand(3, 3), (1, 3)))  # subject ends at the last token
    assert torch.isnan(g2[GROUPS.index("first_subsequent")]).all()
    assert torch.isnan(g2[GROUPS.index("further")]).all()


def test_mean_ci_matches_the_formula_and_ignores_nan():
    x = torch.tensor([[1.0], [2.0], [3.0], [float("nan")]])
    m, c, n = mean_ci(x)
    assert float(m) == pytest.approx(2.0) and int(n) == 3
    assert float(c) == pytest.approx(1.96 * 1.0 / math.sqrt(3))


def test_load_facts_accepts_dicts_objects_and_paths(tmp_path):
    p = tmp_path / "k.json"
    p.write_text(json.dumps([{"known_id": 7, "prompt": "A is in", "subject": "A", "attribute": "B", "prediction": "C"}]))
    (f,) = load_facts(p)
    assert f == Fact(prompt="A is in", subject="A", attribute="B", known_id=7)
    assert load_facts([f]) == [f]
    with pytest.raises(ValueError, match="facts"):
        load_facts(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="prompt"):
        load_facts([{"subject": "A"}])


def test_trace_dataset_keeps_known_facts_and_resumes(tiny_model, tmp_path):
    facts = FACTS + [{"known_id": 3, "prompt": "Berlin is a city in", "subject": "Berlin", "attribute": "zzzz-not-the-answer"}]
    out = tmp_path / "run"
    res = trace_dataset(tiny_model, facts, kinds=("resid", "mlp"), out=out, samples=2, noise=NOISE, window=2, progress=False)
    assert res.n_facts == 3 and res.n_dropped == 1 and res.n_tried == 4
    assert res.effects["mlp"].shape == (3, len(GROUPS), tiny_model.cfg.n_layers)
    lines = (out / "traces.jsonl").read_text().splitlines()
    assert len(lines) == 4
    mean, ci = res.curve("mlp", "last_subject")
    assert mean.shape == ci.shape == (tiny_model.cfg.n_layers,)
    assert torch.isfinite(ci).all()
    # a rerun reads every fact back instead of tracing again
    again = trace_dataset(tiny_model, facts, kinds=("resid", "mlp"), out=out, samples=2, noise=NOISE, window=2, progress=False)
    assert len((out / "traces.jsonl").read_text().splitlines()) == 4
    assert torch.allclose(again.effects["mlp"], res.effects["mlp"], atol=0, rtol=0, equal_nan=True)
    # other settings in the same folder are refused
    with pytest.raises(ValueError, match="other settings"):
        trace_dataset(tiny_model, facts, kinds=("resid", "mlp"), out=out, samples=3, noise=NOISE, window=2, progress=False)
    summary = res.summary()
    json.dumps(summary)
    assert summary["n_facts"] == 3
    res.save(out)
    assert (out / "heatmaps.html").exists() and (out / "lines.html").exists()


def test_trace_dataset_resumes_after_interruption(tiny_model, tmp_path):
    out = tmp_path / "run"
    first = trace_dataset(tiny_model, FACTS, kinds=("mlp",), n=2, out=out, samples=1, noise=NOISE, window=2, progress=False)
    assert first.n_facts == 2
    with open(out / "traces.jsonl", "a") as f:
        f.write('{"known_id": 2, "trunc')  # a write cut short
    full = trace_dataset(tiny_model, FACTS, kinds=("mlp",), out=out, samples=1, noise=NOISE, window=2, progress=False)
    assert full.n_facts == 3
    assert torch.allclose(full.effects["mlp"][:2], first.effects["mlp"], atol=0, rtol=0, equal_nan=True)
    # the torn line was cut before the append: every line parses, fact 2 is written once
    rows = [json.loads(line) for line in (out / "traces.jsonl").read_text().splitlines()]
    assert [r["known_id"] for r in rows] == [0, 1, 2]


def test_trace_dataset_refuses_a_corrupt_middle_line(tiny_model, tmp_path):
    """An unreadable line with facts after it is corruption, not a torn write: raise, never skip it."""
    out = tmp_path / "run"
    trace_dataset(tiny_model, FACTS, kinds=("mlp",), n=2, out=out, samples=1, noise=NOISE, window=2, progress=False)
    path = out / "traces.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + '{"known_id": 1, "bro\n' + lines[1] + "\n")
    before = path.read_bytes()
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        trace_dataset(tiny_model, FACTS, kinds=("mlp",), out=out, samples=1, noise=NOISE, window=2, progress=False)
    assert path.read_bytes() == before  # nothing cut or appended


def test_known_mask_matches_clean_top1(tiny_model):
    facts = load_facts(FACTS)
    assert known_mask(tiny_model, facts) == [True, True, True]
    wrong = [Fact(prompt=f.prompt, subject=f.subject, attribute="zzzz-not-the-answer") for f in facts]
    assert known_mask(tiny_model, wrong) == [False, False, False]


def test_choose_edit_layer_takes_the_mlp_peak_at_the_last_subject_token(tiny_model, tmp_path):
    res = trace_dataset(tiny_model, FACTS, kinds=("mlp",), samples=2, noise=NOISE, window=1, progress=False)
    choice = choose_edit_layer(facts=res)
    assert isinstance(choice, LayerChoice)
    mean, ci = res.curve("mlp", "last_subject")
    assert choice.layer == int(mean.argmax())
    assert choice.n_facts == 3 and len(choice.curve) == tiny_model.cfg.n_layers
    assert choice.margin >= 0 and choice.runner_up != choice.layer
    direct = choose_edit_layer(tiny_model, FACTS, samples=2, noise=NOISE, window=1, progress=False, cache_dir=tmp_path)
    expect = choose_from_result(res)
    assert direct.layer == expect.layer and direct.n_facts == expect.n_facts
    assert torch.allclose(torch.tensor(direct.curve), torch.tensor(expect.curve), atol=1e-6)


def test_choose_edit_layer_with_any_n_fills_the_cache_the_editors_read(tiny_model, tmp_path, monkeypatch):
    """A 2-fact choice is cached under the weights hash; `default_layer` then reads it and traces nothing."""
    import tracer.layer
    from editor import hparams
    from tracer.layer import cached_layer_choice, edit_layer_path

    choice = choose_edit_layer(tiny_model, FACTS, n=2, samples=2, noise=NOISE, window=1, progress=False, cache_dir=tmp_path)
    cached = cached_layer_choice(tiny_model, cache_dir=tmp_path)
    assert cached["layer"] == choice.layer and cached["n_facts"] == 2
    assert cached["curve"] == pytest.approx(list(choice.curve))
    path = edit_layer_path(tiny_model, cache_dir=tmp_path)
    assert path.parent == tmp_path / "edit_layer" and path.exists()

    def must_not_trace(*a, **k):
        raise AssertionError("default_layer traced although a choice is cached")

    monkeypatch.setattr(tracer.layer, "choose_edit_layer", must_not_trace)
    assert hparams.default_layer(tiny_model, cache_dir=tmp_path) == choice.layer
    monkeypatch.setenv("ROMELENS_CACHE", str(tmp_path))  # the editors' default cache root
    assert hparams.rome_hparams(tiny_model).layer == choice.layer
    assert hparams.memit_hparams(tiny_model).layers[-1] == choice.layer
    assert edit_layer_path(tiny_model, cache_dir="none") is None


def test_choose_edit_layer_keeps_its_files_under_the_callers_cache_dir(tiny_model, tmp_path, monkeypatch):
    # before, the noise statistics tracing measures went to the default cache root whatever cache_dir said
    facts = tmp_path / "known_1000.json"
    facts.write_text(json.dumps(FACTS))
    monkeypatch.setenv("ROMELENS_CACHE", str(tmp_path / "default"))
    mine = tmp_path / "mine"
    choose_edit_layer(tiny_model, facts, n=2, samples=2, window=1, progress=False, cache_dir=mine)
    assert sorted(p.parent.name for p in mine.rglob("*.json")) == ["edit_layer", "noise"]
    choose_edit_layer(tiny_model, facts, n=2, samples=2, window=1, progress=False, cache_dir="none")  # writes nothing
    assert not (tmp_path / "default").exists() and len(list(mine.rglob("*.json"))) == 2


def test_trace_dataset_groups_restrict_tokens(tiny_model):
    res = trace_dataset(tiny_model, FACTS, kinds=("mlp",), groups=("last_subject",), samples=1, noise=NOISE, window=2, progress=False)
    mean = res.mean("mlp")
    assert torch.isfinite(mean[GROUPS.index("last_subject")]).all()
    assert torch.isnan(mean[GROUPS.index("last")]).all()
    full = trace_dataset(tiny_model, FACTS, kinds=("mlp",), samples=1, noise=NOISE, window=2, progress=False)
    assert torch.allclose(full.curve("mlp")[0], res.curve("mlp")[0], atol=1e-6)
    with pytest.raises(ValueError, match="groups"):
        trace_dataset(tiny_model, FACTS, groups=("subject",), noise=NOISE)


def test_choose_edit_layer_without_inputs_raises():
    with pytest.raises(ValueError, match="choose_edit_layer"):
        choose_edit_layer()


def test_trace_dataset_bad_kinds_raise(tiny_model):
    with pytest.raises(ValueError, match="kinds"):
        trace_dataset(tiny_model, FACTS, kinds=("embed",), noise=NOISE)
    with pytest.raises(ValueError, match="n 0"):
        trace_dataset(tiny_model, FACTS, n=0, noise=NOISE)


@pytest.mark.integration
def test_gemma_trace_dataset_on_20_known_facts(gemma, shared_data, tmp_path):
    # one noise sample and two token rows per fact keep this to about a minute on a 2-core CPU
    res = trace_dataset(
        gemma, shared_data / "known_1000.json", kinds=("mlp",), n=20, samples=1, out=tmp_path, progress=False,
        groups=("first_subject", "last_subject"),
    )
    assert res.n_facts == 20 and res.n_tried >= 20 and res.n_tried == res.n_facts + res.n_dropped
    mean, ci = res.curve("mlp", "last_subject")
    assert mean.shape == ci.shape == (gemma.cfg.n_layers,)
    assert torch.isfinite(mean).all() and torch.isfinite(ci).all() and (ci > 0).all()
    assert float(res.high.mean()) > float(res.low.mean())
    assert float(mean.max()) > 0  # restoring MLPs at the last subject token helps on average
    # the paper's finding holds on average for Gemma-3-270m: the MLP effect is strongest at the
    # last subject token (measured over these 20 facts with 10 samples: peak 0.096 at layer 4,
    # vs 0.038 at the first subject token; docs/tracing.md), even though the single Eiffel
    # Tower prompt peaks at its first subject token
    first, _ = res.curve("mlp", "first_subject")
    assert float(mean.max()) > float(first.max())
    lines = (tmp_path / "traces.jsonl").read_text().splitlines()
    assert len(lines) == res.n_tried


def test_cast_model_casts_parameters_buffers_and_cfg(tiny_model):
    import copy

    from tracer.model import cast_model, model_dtype

    m = cast_model(copy.deepcopy(tiny_model), "bfloat16")
    assert model_dtype(m) == torch.bfloat16 and m.cfg.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert all(b.dtype == torch.bfloat16 for b in m.buffers() if b.is_floating_point())
    assert torch.isfinite(m(m.to_tokens("Tokyo is the capital of")).float()).all()
    with pytest.raises(ValueError, match="dtype"):
        cast_model(m, "int8")


def test_trace_dataset_records_a_reduced_dtype_and_refuses_to_mix(tiny_model, tmp_path):
    # A bf16 run must not resume (and silently extend) an fp32 folder, nor the other way round.
    import copy

    from tracer.model import cast_model

    opts = dict(kinds=("mlp",), samples=2, noise=NOISE, window=2, progress=False)
    fp32 = trace_dataset(tiny_model, FACTS, out=tmp_path / "fp32", **opts)
    bf16 = cast_model(copy.deepcopy(tiny_model), torch.bfloat16)
    with pytest.raises(ValueError, match="other settings"):
        trace_dataset(bf16, FACTS, out=tmp_path / "fp32", **opts)
    low = trace_dataset(bf16, FACTS, out=tmp_path / "bf16", **opts)
    with pytest.raises(ValueError, match="other settings"):
        trace_dataset(tiny_model, FACTS, out=tmp_path / "bf16", **opts)
    assert "dtype" not in json.loads((tmp_path / "fp32" / "config.json").read_text())
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    both = [i for i in fp32.known_ids if i in low.known_ids]
    assert both
    a = fp32.effects["mlp"][[fp32.known_ids.index(i) for i in both]]
    b = low.effects["mlp"][[low.known_ids.index(i) for i in both]]
    assert (a - b).nan_to_num().abs().max() < 0.05
