"""The resumable runner with a fake method on the tiny model: restore, resume, batching, failures."""

import argparse
import json

import pytest
from pathlib import Path

from benchmarks import runner
from benchmarks.counterfact import evaluate_counterfact, summarize_counterfact
from benchmarks.data import load_counterfact
from tests.benchmarks.fakes import RankOneMethod
from tests.conftest import FIXTURES
from tracer import weights_hash


@pytest.fixture
def records():
    return load_counterfact(FIXTURES / "counterfact_tiny.json")


def evaluate(model, record):
    return evaluate_counterfact(model, record, gen_tokens=0)


def test_no_edit_method_and_registry():
    method = runner.get_method("none")
    with method.edit_many(None, []) as e:
        assert e.restore() is None
    with pytest.raises(ValueError, match="method 'nonsense'"):
        runner.get_method("nonsense")


def test_run_edits_evaluates_and_restores(tiny_model, records, tmp_path):
    before = weights_hash(tiny_model)
    base = [evaluate(tiny_model, r) for r in records]
    method = RankOneMethod()
    rows = runner.run_records(model=tiny_model, method=method, records=records, out_dir=tmp_path, evaluate=evaluate)
    assert weights_hash(tiny_model) == before
    assert [r["case_id"] for r in rows] == [101, 102, 103]
    assert method.calls == [["The Colosseum"], ["Michael Jordan"], ["Danielle Darrieux"]]
    # the edit was in place while evaluating: scores differ from the unedited model's
    assert any(r["nll"] != b["nll"] for r, b in zip(rows, base))
    lines = (tmp_path / runner.RECORDS).read_text().splitlines()
    assert [json.loads(x)["case_id"] for x in lines] == [101, 102, 103]
    assert all(r["seconds"] > 0 for r in rows)


def test_records_do_not_affect_each_other(tiny_model, records, tmp_path):
    method = RankOneMethod()
    alone = runner.run_records(model=tiny_model, method=method, records=records[2:], out_dir=tmp_path / "a",
                               evaluate=evaluate)
    together = runner.run_records(model=tiny_model, method=method, records=records, out_dir=tmp_path / "b",
                                  evaluate=evaluate)
    assert alone[0]["nll"] == together[2]["nll"]


class Interrupt(Exception):
    pass


def test_resume_after_interruption_gives_same_summary(tiny_model, records, tmp_path):
    full = runner.run_records(model=tiny_model, method=RankOneMethod(), records=records, out_dir=tmp_path / "full",
                              evaluate=evaluate)
    seen = []

    def flaky(model, record):
        if record.case_id == 102:
            raise Interrupt  # e.g. the job was killed while evaluating the second record
        seen.append(record.case_id)
        return evaluate(model, record)

    before = weights_hash(tiny_model)
    with pytest.raises(Interrupt):
        runner.run_records(model=tiny_model, method=RankOneMethod(), records=records, out_dir=tmp_path / "r",
                           evaluate=flaky)
    assert weights_hash(tiny_model) == before  # the context manager restored the edit
    assert seen == [101]

    # simulate a kill in the middle of writing a line
    with open(tmp_path / "r" / runner.RECORDS, "a") as f:
        f.write('{"case_id": 102, "es": 1.0, "nl')

    again = []

    def counting(model, record):
        again.append(record.case_id)
        return evaluate(model, record)

    method = RankOneMethod()
    resumed = runner.run_records(model=tiny_model, method=method, records=records, out_dir=tmp_path / "r",
                                 evaluate=counting)
    assert again == [102, 103]  # 101 was not redone; the truncated 102 was
    assert method.calls == [["Michael Jordan"], ["Danielle Darrieux"]]
    lines = (tmp_path / "r" / runner.RECORDS).read_text().splitlines()
    assert [json.loads(x)["case_id"] for x in lines] == [101, 102, 103]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "edit_seconds")} for r in rows]  # noqa: E731
    assert strip(resumed) == strip(full)
    assert summarize_counterfact(resumed) == summarize_counterfact(full)

    # a third run has nothing left to do, and leaves the file exactly as it was
    content = (tmp_path / "r" / runner.RECORDS).read_bytes()
    nothing = []
    runner.run_records(model=tiny_model, method=method, records=records, out_dir=tmp_path / "r",
                       evaluate=lambda m, r: nothing.append(r) or {})
    assert nothing == []
    assert (tmp_path / "r" / runner.RECORDS).read_bytes() == content


def test_read_rows_repairs_only_a_truncated_tail(tmp_path):
    path = tmp_path / runner.RECORDS
    good = '{"case_id": 1}\n{"case_id": 2}\n'
    path.write_text(good)
    assert [r["case_id"] for r in runner.read_rows(path, repair=True)] == [1, 2]
    assert path.read_text() == good
    path.write_text(good + '{"case_id": 3, "es"')
    assert [r["case_id"] for r in runner.read_rows(path, repair=True)] == [1, 2]
    assert path.read_text() == good
    path.write_text(good + '{"case_id": 3}')  # complete JSON but no newline: redone, to be safe
    assert len(runner.read_rows(path, repair=True)) == 2 and path.read_text() == good


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / runner.RECORDS
    path.write_text('{"case_id": 1}\nnot json\n{"case_id": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        runner.read_rows(path)


def test_batch_applies_k_edits_at_once(tiny_model, records, tmp_path):
    method = RankOneMethod()
    ppl_calls = []

    def ppl(model):
        ppl_calls.append(1)
        return 12.5

    rows = runner.run_records(model=tiny_model, method=method, records=records, out_dir=tmp_path, evaluate=evaluate,
                              batch=2, perplexity=ppl)
    assert method.calls == [["The Colosseum", "Michael Jordan"], ["Danielle Darrieux"]]
    assert len(ppl_calls) == 2 and [("ppl_after" in r) for r in rows] == [True, False, True]
    # a resumed batch re-applies the whole batch but evaluates only what is missing
    lines = (tmp_path / runner.RECORDS).read_text().splitlines()
    (tmp_path / runner.RECORDS).write_text(lines[0] + "\n")
    method2 = RankOneMethod()
    rows2 = runner.run_records(model=tiny_model, method=method2, records=records, out_dir=tmp_path,
                               evaluate=evaluate, batch=2)
    assert method2.calls == method.calls
    assert rows2[1]["nll"] == rows[1]["nll"]


def test_failed_edit_is_recorded_not_fatal(tiny_model, records, tmp_path):
    rows = runner.run_records(model=tiny_model, method=RankOneMethod(fail_on="Michael Jordan"), records=records,
                              out_dir=tmp_path, evaluate=evaluate)
    assert "error" in rows[1] and "cannot be edited" in rows[1]["error"]
    assert "es" in rows[0] and "es" in rows[2]
    s = runner.write_summary(out_dir=tmp_path, rows=rows, columns=summarize_counterfact(rows),
                             column_order=["S", "ES"], meta={"benchmark": "counterfact", "method": "fake"},
                             requested=3)
    assert s["records_failed"] == 1 and s["records_evaluated"] == 2


def test_bad_arguments(tiny_model, records, tmp_path):
    with pytest.raises(ValueError, match="batch 0"):
        runner.run_records(model=tiny_model, method=RankOneMethod(), records=records, out_dir=tmp_path,
                           evaluate=evaluate, batch=0)


def test_atomic_write_leaves_no_temp_files(tmp_path, monkeypatch):
    runner.atomic_write_text(tmp_path / "a.json", "{}\n")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    # a write that fails half-way leaves the old file intact and no temporary file behind
    import tracer.files

    def broken(self, text, encoding=None):
        Path.write_bytes(self, text[:3].encode())
        raise OSError("disk full")

    monkeypatch.setattr(tracer.files.Path, "write_text", broken)
    with pytest.raises(OSError, match="disk full"):
        runner.atomic_write_text(tmp_path / "a.json", '{"long": "replacement"}\n')
    assert (tmp_path / "a.json").read_text() == "{}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_batch_edit_is_saved_and_reused_on_resume(tiny_model, records, tmp_path):
    # a real batch edit (FT-L: no statistics needed) is saved; a resumed run re-applies the
    # saved file instead of recomputing the edit, and evaluates the same edited model
    from editor import METHODS, FTHParams

    hp = FTHParams(layer=1, num_steps=3, lr=1e-2, norm_constraint=1e-2)
    before = weights_hash(tiny_model)
    rows = runner.run_records(model=tiny_model, method=METHODS["ft-l"], records=records, out_dir=tmp_path,
                              evaluate=evaluate, batch=3, hparams=hp)
    saved = tmp_path / "edits" / "batch0000.safetensors"
    assert saved.exists() and weights_hash(tiny_model) == before
    assert rows[0]["edit_seconds"] > 0 and "edit_seconds" not in rows[1]
    lines = (tmp_path / runner.RECORDS).read_text().splitlines()
    (tmp_path / runner.RECORDS).write_text(lines[0] + "\n")
    failing = RankOneMethod(fail_on="The Colosseum")  # would record an error if it were called
    rows2 = runner.run_records(model=tiny_model, method=failing, records=records, out_dir=tmp_path,
                               evaluate=evaluate, batch=3)
    assert failing.calls == [] and "error" not in rows2[1]
    assert rows2[1]["nll"] == rows[1]["nll"] and rows2[2]["nll"] == rows[2]["nll"]
    assert weights_hash(tiny_model) == before


def test_hparams_record_names_the_resolved_hparams(tiny_model):
    from types import SimpleNamespace

    from editor import ROMEHParams

    hp = ROMEHParams(layer=1)
    method = SimpleNamespace(hparams_for=lambda model: hp)
    assert runner.hparams_record(method, tiny_model, None) == f"preset: {hp!r}"
    over = ROMEHParams(layer=0)
    assert runner.hparams_record(method, tiny_model, over) == f"overridden: {over!r}"
    assert runner.hparams_record(object(), tiny_model, None) is None  # 'none' has no hparams


def test_edit_summary_reads_each_method_diagnostics():
    class E:
        def __init__(self, d):
            self.diagnostics = d

    rome_like = E({"steps": [{"nll_curve": [3.0, 0.5, 0.04]}], "delta_ratio": {4: 0.05}})
    assert runner.edit_summary(rome_like) == {"edit_final_nll": [0.04], "edit_steps": [3], "delta_ratio": {"4": 0.05}}
    memit_like = E({"nll_curves": [[2.0, 0.1], [1.0, 0.3, 0.02]]})
    assert runner.edit_summary(memit_like) == {"edit_final_nll": [0.1, 0.02], "edit_steps": [2, 3]}
    assert runner.edit_summary(E({"nll_curve": [1.0, 0.2]}))["edit_final_nll"] == [0.2]
    assert runner.edit_summary(object()) == {}
    clamped = E({"steps": [{"nll_curve": [3.0, 0.9], "delta_norm": 2.25, "value_norm": 3.0}]})
    assert runner.edit_summary(clamped)["delta_over_value"] == [0.75]  # where clamp_norm_factor 0.75 binds


def test_batch_edit_is_saved_as_an_edit_before_it_is_applied(tiny_model, records, tmp_path, monkeypatch):
    # the saved batch edit is an `editor.Edit` (requests, resolved hparams, the unedited model's
    # hash) written before the model changes: a failed save is recorded and leaves the model unedited
    from editor import METHODS, Edit, FTHParams

    hp = FTHParams(layer=1, num_steps=3, lr=1e-2, norm_constraint=1e-2)
    before = weights_hash(tiny_model)
    runner.run_records(model=tiny_model, method=METHODS["ft-l"], records=records[:2], out_dir=tmp_path / "a",
                       evaluate=evaluate, batch=2, hparams=hp)
    e = Edit.load(tmp_path / "a" / "edits" / "batch0000.safetensors")
    assert e.hparams == hp and e.model_hash == before and [r.subject for r in e.requests] == ["The Colosseum", "Michael Jordan"]

    def full_disk(self, path):
        raise OSError("disk full")

    monkeypatch.setattr(Edit, "save", full_disk)
    rows = runner.run_records(model=tiny_model, method=METHODS["ft-l"], records=records[:2], out_dir=tmp_path / "b",
                              evaluate=evaluate, batch=2, hparams=hp)
    assert all("disk full" in r["error"] for r in rows)
    assert weights_hash(tiny_model) == before


def test_execute_resolves_the_hparams_once_and_every_edit_gets_them(tiny_model, tmp_path, monkeypatch, records):

    import tracer
    from editor import ROMEHParams

    hp = ROMEHParams(layer=1)

    class Preset(RankOneMethod):
        def __init__(self):
            super().__init__()
            self.resolved, self.given = 0, []

        def hparams_for(self, model, layer=None, cache_dir=None):
            self.resolved += 1
            return hp

        def edit_many(self, model, requests, hparams=None, **kw):
            self.given.append(hparams)
            return super().edit_many(model, requests)

    method = Preset()
    monkeypatch.setattr(runner, "get_method", lambda name: method)
    monkeypatch.setattr(tracer, "load_model", lambda *a, **k: tiny_model)
    parser = argparse.ArgumentParser()
    runner.add_common_args(parser)
    args = parser.parse_args(["--method", "rome", "--out", str(tmp_path / "r"), "--ppl-tokens", "0", "--threads", "0",
                              "--cache-dir", str(tmp_path / "cache")])
    run = runner.execute(args, records=records[:3], evaluate=evaluate, desc="t")
    assert method.resolved == 1 and method.given == [hp] * 3
    assert run["hparams_record"] == f"preset: {hp!r}" and run["restored"]


@pytest.mark.parametrize("argv, corpus", [
    ([], None),                                                   # the editor's default corpus
    (["--wikitext", "w.txt"], "w.txt"),                           # the perplexity text serves both
    (["--wikitext", "w.txt", "--corpus", "c.txt"], "c.txt"),      # --corpus wins
])
def test_stats_corpus_follows_the_command_line(argv, corpus, tmp_path):
    # A run on a machine without ../shared/data must be able to name the statistics text:
    # before --corpus the editor always looked in ../shared/data and failed there.
    parser = argparse.ArgumentParser()
    runner.add_common_args(parser)
    kw = runner.edit_kwargs(parser.parse_args(["--method", "memit", "--out", str(tmp_path), *argv]))
    assert kw.get("corpus") == corpus and kw["cache_dir"]
    none = runner.edit_kwargs(parser.parse_args(["--method", "none", "--out", str(tmp_path), *argv]))
    assert none == {}


def test_missing_corpus_error_names_the_options(tiny_model, tmp_path):
    from editor.stats import layer_stats

    with pytest.raises(ValueError, match=r"--corpus.*ROMELENS_DATA"):
        layer_stats(tiny_model, [0], corpus=str(tmp_path / "absent.txt"), n_tokens=1000, cache_dir=None)


@pytest.mark.parametrize("flag", ["--corpus", "--wikitext"])
def test_a_missing_text_file_is_refused_before_loading(flag, tmp_path, monkeypatch):
    # Found first at the first edit, it became an error row for every record, and the rerun
    # then skipped them all as done.
    import tracer
    from benchmarks import counterfact

    monkeypatch.setattr(tracer, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match=rf"{flag} .*typo.txt.* is not a file"):  # before RS's TF-IDF reads --wikitext
        counterfact.main(["--method", "rome", "--n", "2", "--out", str(tmp_path / "x"), flag, str(tmp_path / "typo.txt"),
                          "--data", str(FIXTURES / "counterfact_tiny.json")])
    assert not (tmp_path / "x").exists()


def test_select_case_ids_keeps_file_order_and_reads_files(records, tmp_path):
    ids = [r.case_id for r in records]
    assert [r.case_id for r in runner.select_case_ids(records, f"{ids[2]},{ids[0]}")] == [ids[0], ids[2]]
    (tmp_path / "ids.txt").write_text(f"{ids[1]}\n{ids[2]}\n")
    assert [r.case_id for r in runner.select_case_ids(records, f"@{tmp_path / 'ids.txt'}")] == ids[1:3]
    assert runner.select_case_ids(records, None) == records


def test_select_case_ids_takes_final_gen_case_ids_as_written(records, tmp_path):
    # a sequential run's summary.json names its generation sample as a JSON list; that list,
    # pasted or saved as it is (e.g. by jq), selects the same records
    ids = [r.case_id for r in records]
    (tmp_path / "ids.json").write_text(json.dumps({"ids": ids[1:]}["ids"], indent=2))
    assert [r.case_id for r in runner.select_case_ids(records, f"@{tmp_path / 'ids.json'}")] == ids[1:]
    assert [r.case_id for r in runner.select_case_ids(records, json.dumps(ids[:2]))] == ids[:2]


@pytest.mark.parametrize("spec, match", [("1,x", "must be an integer"), ("[1]]", "must be an integer"), (" , ", "lists no case_id"),
                                         ("999999", r"not in the --start/--n slice.*999999")])
def test_select_case_ids_bad_input(records, spec, match):
    with pytest.raises(ValueError, match=match):
        runner.select_case_ids(records, spec)


def test_cli_case_ids_scores_exactly_those_records(tiny_model, tmp_path, monkeypatch, tiny_wikitext):
    # the unedited model scored on a sequential run's generation sample (final_gen_case_ids)
    import tracer
    from benchmarks import counterfact

    monkeypatch.setattr(tracer, "load_model", lambda *a, **k: tiny_model)
    out = tmp_path / "none"
    s = counterfact.main(["--method", "none", "--n", "3", "--out", str(out), "--case-ids", "103,101",
                          "--data", str(FIXTURES / "counterfact_tiny.json"), "--gen-tokens", "2", "--ppl-tokens", "0",
                          "--wikitext", str(tiny_wikitext)])
    rows = [json.loads(l) for l in (out / "records.jsonl").read_text().splitlines()]
    assert sorted(r["case_id"] for r in rows) == [101, 103] and s["records_requested"] == 2


def test_cli_unknown_case_id_is_refused_before_loading(tmp_path, monkeypatch):
    import tracer
    from benchmarks import zsre

    monkeypatch.setattr(tracer, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match="not in the --start/--n slice"):
        zsre.main(["--n", "2", "--out", str(tmp_path / "x"), "--case-ids", "424242",
                   "--data", str(FIXTURES / "zsre_tiny.json")])
    assert not (tmp_path / "x").exists()


def test_a_saved_batch_edit_of_other_records_is_not_reapplied(tiny_model, records, tmp_path):
    # batch files are named by position (batch0000, ...): a rerun into the same directory over
    # another selection (--case-ids, or a longer --n whose last chunk grows) has other records
    # at that position, and must not evaluate them on the edit saved for the first ones
    from editor import METHODS, Edit, FTHParams

    hp = FTHParams(layer=1, num_steps=3, lr=1e-2, norm_constraint=1e-2)
    run = dict(model=tiny_model, method=METHODS["ft-l"], evaluate=evaluate, batch=2, hparams=hp)
    runner.run_records(records=records[:2], out_dir=tmp_path / "a", **run)
    rows = runner.run_records(records=records[2:], out_dir=tmp_path / "a", **run)  # e.g. --case-ids 103
    fresh = runner.run_records(records=records[2:], out_dir=tmp_path / "b", **run)
    assert rows[0]["nll"] == fresh[0]["nll"]
    saved = Edit.load(tmp_path / "a" / "edits" / "batch0000.safetensors")
    assert [r.subject for r in saved.requests] == [records[2].request().subject]
