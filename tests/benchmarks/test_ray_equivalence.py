"""benchmarks.ray_equivalence: reads two run folders and reports where they differ."""

import json

import pytest

from benchmarks.ray_equivalence import compare_records, compare_traces, main

CONFIG = {"model": "tiny", "kinds": ["resid", "mlp"], "groups": ["last_subject", "last"], "window": 2, "samples": 3,
          "noise_std": 0.5, "seed": 0, "method": "exact"}


def trace_folder(path, scores, *, config=CONFIG, order=(0, 1, 2), mlp_curve=(0.1, 0.3, 0.2)):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    lines = [{"known_id": 1, "prompt": "p", "subject": "s", "attribute": "a", "correct": False}]
    lines += [{"known_id": i, "prompt": "p", "subject": "s", "attribute": "a", "correct": True, "high": 0.5, "low": 0.1,
               "scores": {k: s for k, s in scores[i].items()}} for i in order if i != 1]
    (path / "traces.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (path / "summary.json").write_text(json.dumps({"groups": ["last_subject", "last"],
                                                   "mlp": {"mean": [list(mlp_curve), [0.0, 0.0, 0.0]]}}))
    return path


def scores(shift=0.0):
    base = {"resid": [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], "mlp": [[0.2, 0.1, 0.0], [0.3, 0.2, 0.1]]}
    return {0: base, 2: {"resid": [[v + shift for v in row] for row in base["resid"]], "mlp": base["mlp"]}}


def test_the_same_traces_in_another_order_are_equal(tmp_path):
    a = trace_folder(tmp_path / "a", scores())
    b = trace_folder(tmp_path / "b", scores(), order=(2, 1, 0))  # completion order differs on the Ray path
    r = compare_traces(a, b)
    assert r["scores"]["resid"]["max_abs"] == 0 and r["scores"]["mlp"]["n_facts"] == 2
    assert r["known"] == {"same": True, "a": 2, "b": 2} and r["layer"] == {"a": 1, "b": 1, "same": True}


def test_a_score_or_layer_that_moved_is_reported(tmp_path):
    a = trace_folder(tmp_path / "a", scores())
    b = trace_folder(tmp_path / "b", scores(shift=1e-3), mlp_curve=(0.4, 0.3, 0.2))
    r = compare_traces(a, b)
    assert r["scores"]["resid"]["max_abs"] == pytest.approx(1e-3, rel=1e-5) and r["scores"]["mlp"]["max_abs"] == 0
    assert r["layer"] == {"a": 1, "b": 0, "same": False}


def test_runs_of_other_settings_are_refused(tmp_path):
    a = trace_folder(tmp_path / "a", scores())
    b = trace_folder(tmp_path / "b", scores(), config=CONFIG | {"samples": 10})
    with pytest.raises(ValueError, match="samples"):
        compare_traces(a, b)
    c = trace_folder(tmp_path / "c", scores(), config=CONFIG | {"groups": ["last"]})
    with pytest.raises(ValueError, match="groups"):
        compare_traces(a, c)
    d = trace_folder(tmp_path / "d", scores(), config=CONFIG | {"groups": ["last"]})
    with pytest.raises(ValueError, match="last_subject"):
        compare_traces(c, d)


def records_folder(path, rows, restored=True, method="rome"):
    path.mkdir()
    (path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps({"model_restored": restored, "model": "tiny", "method": method,
                                                   "batch": None, "hparams": "preset"}))
    return path


def test_records_are_matched_by_case_id_and_every_number_compared(tmp_path, capsys):
    row = {"case_id": 3, "es": 1.0, "nll": {"rewrite": {"new": [0.5, 0.25]}}, "text": ["x"], "seconds": 4.0}
    a = records_folder(tmp_path / "a", [row, row | {"case_id": 4}])
    b = records_folder(tmp_path / "b", [row | {"case_id": 4, "seconds": 9.0},
                                        row | {"nll": {"rewrite": {"new": [0.5, 0.5]}}, "text": ["y"], "es": float("nan")}],
                       restored=False)
    r = compare_records(a, b)
    assert r["case_ids"] == 2 and r["only_a"] == r["only_b"] == []
    assert r["max_abs"] == {"es": float("inf"), "nll": 0.25}  # a NaN on one side only is a difference; times are not
    assert r["texts_equal"] is False and r["model_restored"] == {"a": True, "b": False}
    main(["--records", str(a), str(b)])
    assert "nll 0.25" in capsys.readouterr().out


def test_records_of_another_method_are_refused(tmp_path):
    row = {"case_id": 3, "es": 1.0}
    a = records_folder(tmp_path / "a", [row])
    b = records_folder(tmp_path / "b", [row], method="memit")
    with pytest.raises(ValueError, match="method"):
        compare_records(a, b)


def test_nothing_to_compare_is_an_error():
    with pytest.raises(SystemExit):
        main([])
