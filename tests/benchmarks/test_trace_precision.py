"""benchmarks.trace_precision on the tiny model: an fp32 reference folder against a bf16 trace."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from benchmarks import trace_precision
from tracer.dataset import trace_dataset
from tracer.noise import NoiseScale

FACTS = [
    {"known_id": 0, "prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower", "attribute": None},
    {"known_id": 1, "prompt": "The Colosseum is located in the city of", "subject": "Colosseum", "attribute": None},
    {"known_id": 2, "prompt": "Tokyo is the capital of", "subject": "Tokyo", "attribute": None},
]


@pytest.fixture
def reference(tiny_model, tmp_path, monkeypatch):
    facts = tmp_path / "known.json"
    facts.write_text(json.dumps(FACTS))
    trace_dataset(tiny_model, str(facts), samples=2, window=2, noise=NoiseScale(value=3.0), out=tmp_path / "ref", progress=False)
    monkeypatch.setattr(trace_precision, "load_model", lambda name: copy.deepcopy(tiny_model))
    return facts, tmp_path / "ref"


def test_trace_precision_compares_bf16_with_the_fp32_folder(reference, tmp_path, capsys):
    facts, ref = reference
    report = trace_precision.main(["--reference", str(ref), "--facts", str(facts), "--out", str(tmp_path / "bf16"), "--n", "3", "--layer-n", "3"])
    for k in ("resid", "mlp", "attn"):
        s = report["scores"][k]
        assert s["n_facts"] >= 1 and 0 < s["max_abs"] < 0.1  # bf16 moves the scores, a little
    assert report["layer"]["fp32"] in range(4) and report["layer"]["n_facts"] >= 1
    assert json.loads((tmp_path / "bf16" / "precision.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "bf16" / "scores" / "config.json").read_text())["dtype"] == "bfloat16"
    assert "edit layer on" in capsys.readouterr().out


def test_compare_scores_is_zero_against_itself(reference):
    from tracer.resume import read_jsonl

    _, ref = reference
    lines = read_jsonl(ref / "traces.jsonl", key=lambda r: str(r["known_id"]))
    same = trace_precision.compare_scores(lines, lines, ("mlp",))
    assert same["mlp"]["max_abs"] == 0 and same["mlp"]["argmax_moved"] == 0 and same["high_max_abs"] == 0


def test_trace_precision_refuses_a_reduced_precision_reference(reference, tmp_path):
    facts, ref = reference
    cfg = json.loads((ref / "config.json").read_text()) | {"dtype": "bfloat16"}
    (ref / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit, match="not an exact fp32 run"):
        trace_precision.main(["--reference", str(ref), "--facts", str(facts), "--out", str(tmp_path / "x")])


def test_trace_precision_never_traces_into_the_reference(reference, tmp_path):
    facts, ref = reference
    before = (ref / "traces.jsonl").read_text()
    with pytest.raises(SystemExit, match="known facts"):
        trace_precision.main(["--reference", str(ref), "--facts", str(facts), "--out", str(tmp_path / "x"), "--n", "20"])
    assert (ref / "traces.jsonl").read_text() == before


def test_compare_scores_skips_a_fact_one_side_got_wrong(reference):
    from tracer.resume import read_jsonl

    _, ref = reference
    lines = read_jsonl(ref / "traces.jsonl", key=lambda r: str(r["known_id"]))
    wrong = {i: ({"known_id": r["known_id"], "correct": False} if i == "0" else r) for i, r in lines.items()}
    out = trace_precision.compare_scores(wrong, lines, ("mlp",))  # fp32 wrong, bf16 right: no KeyError
    assert out["mlp"]["n_facts"] == sum(r["correct"] for r in lines.values()) - 1
