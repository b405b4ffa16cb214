"""compare: one table across runs."""

import json

import pytest

from benchmarks import compare


def _summary(path, method, es, benchmark="counterfact"):
    path.mkdir()
    s = {"benchmark": benchmark, "model": "tiny", "method": method, "run": path.name,
         "columns": {"ES": {"mean": es, "ci95": 1.0, "n": 2}}, "records_evaluated": 2, "records_failed": 0,
         "records_per_min": 3.0, "perplexity": {"before": 10.0, "after": 11.0}}
    (path / "summary.json").write_text(json.dumps(s))


def test_compare_table(tmp_path, capsys):
    _summary(tmp_path / "a", "none", 20.0)
    _summary(tmp_path / "b", "rome", 99.0)
    compare.main([str(tmp_path / "a"), str(tmp_path / "b"), "--html", str(tmp_path / "c.html")])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| run | method | ES |")
    assert "| a | none | 20.0 ± 1.0 |" in out[2] and "| b | rome | 99.0 ± 1.0 |" in out[3]
    assert (tmp_path / "c.html").exists()


def test_compare_missing_summary(tmp_path):
    with pytest.raises(ValueError, match="has no summary.json"):
        compare.compare([tmp_path])


@pytest.mark.parametrize("benchmark", ["counterfact", "counterfact-sweep"])  # a sweep's folders hold CounterFact rows
def test_compare_common_records(tmp_path, capsys, benchmark):
    _summary(tmp_path / "a", "none", 20.0, benchmark)
    _summary(tmp_path / "b", "rome", 99.0, benchmark)
    rows_a = [{"case_id": i, "es": 0.0, "ps": 0.0, "ns": 1.0, "em": 0, "pm": 0, "nm": 0} for i in range(4)]
    rows_b = [{"case_id": i, "es": 1.0, "ps": 1.0, "ns": 0.5, "em": 0, "pm": 0, "nm": 0} for i in range(2)]
    (tmp_path / "a" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_a))
    (tmp_path / "b" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_b))
    table = compare.compare([tmp_path / "a", tmp_path / "b"], common=True).splitlines()
    assert table[0].startswith("| run | method | S | ES | PS | NS |")
    assert "| a | none | 0.0 | 0.0 ± 0.0 |" in table[2]
    assert "| b | rome | 75.0 | 100.0 ± 0.0 |" in table[3]


def test_compare_common_mquake_cases(tmp_path):
    # a run stopped early (ROME k=1 after 2 cases) against a finished one: both scored on those 2
    def row(i, es, known):
        stage = {"es": es, "instance": float(known), "mh_gen": 0.0, "mh_lik": 1.0}
        return {"case_id": i, "n_hops": 2, "known_chain": known, "before": stage, "after": stage}

    _summary(tmp_path / "a", "none", 20.0, "mquake")
    _summary(tmp_path / "b", "rome", 99.0, "mquake")
    rows_a = [row(i, [0.0], i == 0) for i in range(4)]
    rows_b = [row(0, [1.0, 1.0], True), row(1, [1.0, 0.0], False)]
    (tmp_path / "a" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_a))
    (tmp_path / "b" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_b))
    a, b = compare.restrict_to_common([tmp_path / "a", tmp_path / "b"], compare.load_summaries([tmp_path / "a", tmp_path / "b"]))
    assert a["records_evaluated"] == b["records_evaluated"] == 2
    assert a["columns"]["ES"]["mean"] == 0.0 and b["columns"]["ES"]["mean"] == 75.0  # pooled over 4 rewrites
    assert b["columns"]["Hop (known)"]["n"] == 1 and a["columns"]["MH-lik"]["mean"] == 100.0
    assert a["breakdown"]["all"]["cases"] == 2 and a["cases_known_chain"] == 1  # not the whole run's 4
