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
