"""benchmarks.atp_agreement's main on the tiny model, reusing an exact run folder."""

from __future__ import annotations

import json

import tracer
from benchmarks import atp_agreement
from tracer import trace as trace_module
from tracer.dataset import trace_dataset
from tracer.noise import NoiseScale

FACTS = [
    {"known_id": 0, "prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower", "attribute": None},
    {"known_id": 1, "prompt": "Tokyo is the capital of", "subject": "Tokyo", "attribute": None},
]


def test_atp_agreement_reuses_an_exact_folder_without_tracing_it_again(tiny_model, tmp_path, monkeypatch):
    facts = tmp_path / "known.json"
    facts.write_text(json.dumps(FACTS))
    exact = tmp_path / "exact"
    trace_dataset(tiny_model, str(facts), samples=2, window=2, noise=NoiseScale(value=2.5), out=exact, progress=False)
    before = (exact / "traces.jsonl").read_text()
    monkeypatch.setattr(tracer, "load_model", lambda name: tiny_model)
    summary = atp_agreement.main(["--facts", str(facts), "--n", "2", "--samples", "2", "--window", "2", "--time-n", "0",
                                  "--exact", str(exact), "--out", str(tmp_path / "agree")])
    assert (exact / "traces.jsonl").read_text() == before  # read back, not traced again
    assert summary["facts"] == 2 and set(summary["layer_choice"]) == {"exact", "atp"}
    atp_cfg = json.loads((tmp_path / "agree" / "atp" / "config.json").read_text())
    assert atp_cfg["noise_std"] == 2.5 and atp_cfg["method"] == "atp"  # AtP ran at the exact folder's noise


def test_atp_agreement_refuses_an_exact_folder_it_would_have_to_extend(tiny_model, tmp_path, monkeypatch):
    import pytest

    facts = tmp_path / "known.json"
    facts.write_text(json.dumps(FACTS))
    monkeypatch.setattr(tracer, "load_model", lambda name: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit, match="no config.json"):
        atp_agreement.main(["--facts", str(facts), "--n", "2", "--exact", str(tmp_path / "nothing"), "--out", str(tmp_path / "a")])
    trace_dataset(tiny_model, str(facts), samples=2, window=2, n=1, noise=NoiseScale(value=2.5), out=tmp_path / "one", progress=False)
    with pytest.raises(SystemExit, match="fewer than --n 2"):
        atp_agreement.main(["--facts", str(facts), "--n", "2", "--exact", str(tmp_path / "one"), "--out", str(tmp_path / "a")])


def test_atp_agreement_compares_the_log_space_estimate(tiny_model, tmp_path, monkeypatch):
    facts = tmp_path / "known.json"
    facts.write_text(json.dumps(FACTS))
    exact = tmp_path / "exact"
    trace_dataset(tiny_model, str(facts), samples=2, window=2, noise=NoiseScale(value=2.5), out=exact, progress=False)
    monkeypatch.setattr(tracer, "load_model", lambda name: tiny_model)
    timed, trace_all = [], trace_module.trace_all
    monkeypatch.setattr(trace_module, "trace_all", lambda *a, **kw: timed.append(kw["method"]) or trace_all(*a, **kw))
    summary = atp_agreement.main(["--facts", str(facts), "--n", "2", "--time-n", "1", "--method", "atp-logp",
                                  "--exact", str(exact), "--out", str(tmp_path / "agree")])
    assert summary["estimate"] == "atp-logp" and timed == ["exact", "atp-logp"]  # the timing traced the estimate asked for
    assert json.loads((tmp_path / "agree" / "atp-logp" / "config.json").read_text())["method"] == "atp-logp"
    assert not (tmp_path / "agree" / "atp").exists()
