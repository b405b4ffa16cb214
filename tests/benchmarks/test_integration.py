"""Gemma-3-270m end to end: ROME runs on 3 CounterFact dev records and on 5 MQuAKE cases write
JSONL and every column, and restore the weights."""

import json

import pytest

import tracer
from benchmarks import counterfact, runner

pytestmark = pytest.mark.integration

COLUMNS = ("S", "ES", "PS", "NS", "GE", counterfact.RS_FALLBACK, "EM", "PM", "NM")


def _rome_available() -> bool:
    try:
        import editor

        return "rome" in editor.METHODS
    except (ImportError, AttributeError):
        return False


@pytest.mark.skipif(not _rome_available(), reason="editor.METHODS['rome'] is not available yet")
def test_rome_counterfact_end_to_end(gemma, shared_data, tmp_path, monkeypatch):
    monkeypatch.setattr(tracer, "load_model", lambda *a, **k: gemma)
    before = tracer.weights_hash(gemma, layers=range(gemma.cfg.n_layers))
    out = tmp_path / "rome"
    s = counterfact.main(["--method", "rome", "--n", "3", "--out", str(out),
                          "--data", str(shared_data / "counterfact_dev.json"),
                          "--wikitext", str(shared_data / "wikitext-2-raw-test.txt"),
                          "--gen-tokens", "5", "--ppl-tokens", "128", "--hparam", "mom2_n_tokens=10000", "--ppl-every", "3", "--threads", "0"])
    rows = [json.loads(x) for x in (out / runner.RECORDS).read_text().splitlines()]
    assert [r["case_id"] for r in rows] == [0, 1, 2]
    assert all("error" not in r for r in rows), rows
    for col in COLUMNS:
        assert col in s["columns"], col
    assert s["records_evaluated"] == 3 and s["model_restored"]
    assert tracer.weights_hash(gemma, layers=range(gemma.cfg.n_layers)) == before
    assert s["perplexity"]["before"] > 1 and s["perplexity"]["after"] > 1
    assert s["columns"]["ES"]["mean"] >= 2 / 3 * 100  # ROME makes the new object win on the rewrite prompt
    summary = json.loads((out / "summary.json").read_text())
    assert summary["columns"] == s["columns"]
    assert "| S | ES | PS | NS | GE |" in (out / "summary.md").read_text()


@pytest.mark.skipif(not _rome_available(), reason="editor.METHODS['rome'] is not available yet")
def test_rome_mquake_k1_end_to_end(gemma, shared_data, tmp_path, monkeypatch):
    # MQuAKE on Gemma: 5 cases, ROME one case at a time; edit-wise success rises, weights restored
    from benchmarks import mquake

    if not (shared_data / "mquake_dev.json").exists():
        pytest.skip("mquake_dev.json is not in the shared data")
    monkeypatch.setattr(tracer, "load_model", lambda *a, **k: gemma)
    before = tracer.weights_hash(gemma, layers=range(gemma.cfg.n_layers))
    out = tmp_path / "mquake-rome"
    s = mquake.main(["--method", "rome", "--n", "5", "--out", str(out), "--data", str(shared_data / "mquake_dev.json"),
                     "--ppl-tokens", "0", "--hparam", "mom2_n_tokens=10000", "--threads", "0"])
    rows = [json.loads(x) for x in (out / runner.RECORDS).read_text().splitlines()]
    assert [r["case_id"] for r in rows] == sorted(r["case_id"] for r in rows) and len(rows) == 5
    assert all("error" not in r for r in rows), rows
    es = s["breakdown"]["all"]
    assert es["after"]["ES"]["mean"] > es["before"]["ES"]["mean"]
    assert es["after"]["ES"]["mean"] >= 60
    assert s["model_restored"] and tracer.weights_hash(gemma, layers=range(gemma.cfg.n_layers)) == before
    assert (out / "before" / runner.RECORDS).exists()  # the unedited pass, resumable on its own
