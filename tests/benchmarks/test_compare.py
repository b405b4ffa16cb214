"""compare: one table across runs."""

import json

import pytest

from benchmarks import compare


def _summary(path, method, es):
    path.mkdir()
    s = {"benchmark": "counterfact", "model": "tiny", "method": method, "run": path.name,
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
