"""Sequential (lifelong) editing on the tiny model: edits accumulate, checkpoints, exact resume, exact restore."""

import json
from dataclasses import replace

import pytest
import torch

from benchmarks.counterfact import evaluate_counterfact
from benchmarks.data import load_counterfact
from benchmarks.runner import get_method
from benchmarks.sequential import CHECKPOINTS, batch_path, run_sequential
from editor import METHODS, Edit
from tests.conftest import FIXTURES
from tests.editor.test_edit import ROME_HP
from tracer import weights_hash
from tracer.model import w_out


@pytest.fixture
def records():
    return load_counterfact(FIXTURES / "counterfact_tiny.json")


def evaluate(model, record):
    return evaluate_counterfact(model, record, gen_tokens=0)


def kw(model, tmp_path):
    return {"stats": torch.eye(model.cfg.d_mlp), "cache_dir": tmp_path / "cache"}


class Killed(RuntimeError):
    pass


class KillAfter:
    """ROME that dies (as a killed process would) when asked for its `n`-th edit."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __getattr__(self, name):  # presets and the rest: ROME's
        return getattr(METHODS["rome"], name)

    def compute(self, *a, **k):
        self.calls += 1
        if self.calls == self.n:
            raise Killed("killed")
        return METHODS["rome"].compute(*a, **k)


def test_edits_accumulate_and_the_model_is_restored(tiny_model, records, tmp_path):
    before = weights_hash(tiny_model)
    out = run_sequential(model=tiny_model, method=METHODS["rome"], records=records, out_dir=tmp_path / "run",
                         evaluate=evaluate, batch=1, hparams=ROME_HP, edit_kwargs=kw(tiny_model, tmp_path),
                         perplexity=lambda m: float(w_out(m, 1).norm()))
    assert out["model_restored"] and out["complete"] and weights_hash(tiny_model) == before
    assert [c["n_edits"] for c in out["checkpoints"]] == [1, 2, 3]
    # the second batch was computed on the model holding the first: its Edit names those weights
    e0, e1 = Edit.load(batch_path(tmp_path / "run", 0)), Edit.load(batch_path(tmp_path / "run", 1))
    assert e0.model_hash == before and e1.model_hash != before
    # the accumulated change grows batch by batch, and the stand-in perplexity follows the weights
    norms = [c["norms"]["1"]["delta_fro"] for c in out["checkpoints"]]
    assert 0 < norms[0] < norms[2] and len({c["perplexity"] for c in out["checkpoints"]}) == 3
    assert out["checkpoints"][-1]["metrics"]["es"] == pytest.approx(sum(r["es"] for r in out["records"]) / 3)
    assert [r["case_id"] for r in out["records"]] == [r.case_id for r in records]


def test_a_killed_run_resumes_to_the_same_edits_and_checkpoints(tiny_model, records, tmp_path):
    common = dict(records=records, evaluate=evaluate, batch=1, hparams=ROME_HP, edit_kwargs=kw(tiny_model, tmp_path))
    before = weights_hash(tiny_model)
    full = run_sequential(model=tiny_model, method=METHODS["rome"], out_dir=tmp_path / "full", **common)
    with pytest.raises(Killed):
        run_sequential(model=tiny_model, method=KillAfter(3), out_dir=tmp_path / "r", **common)
    assert weights_hash(tiny_model) == before  # restored on the error too
    assert [json.loads(l)["n_edits"] for l in (tmp_path / "r" / CHECKPOINTS).read_text().splitlines()] == [1, 2]
    again = KillAfter(99)
    resumed = run_sequential(model=tiny_model, method=again, out_dir=tmp_path / "r", **common)
    assert again.calls == 1  # only the missing batch was computed
    assert resumed["model_restored"] and weights_hash(tiny_model) == before
    for i in range(3):  # the same deltas, bit for bit, so the same final weights
        a, b = Edit.load(batch_path(tmp_path / "full", i)), Edit.load(batch_path(tmp_path / "r", i))
        assert a.model_hash == b.model_hash
        assert all(torch.equal(a.deltas[l].u, b.deltas[l].u) and torch.equal(a.deltas[l].v, b.deltas[l].v) for l in a.deltas)
    strip = lambda cs: [{k: v for k, v in c.items() if k != "seconds"} for c in cs]  # noqa: E731
    assert strip(resumed["checkpoints"]) == strip(full["checkpoints"])
    assert resumed["records"] == full["records"]


def test_checkpoint_every_and_a_seeded_sample(tiny_model, records, tmp_path):
    out = run_sequential(model=tiny_model, method=METHODS["rome"], records=records, out_dir=tmp_path / "run",
                         evaluate=evaluate, batch=1, checkpoint_every=2, sample=2, hparams=ROME_HP,
                         edit_kwargs=kw(tiny_model, tmp_path))
    assert [(c["n_edits"], c["n_scored"]) for c in out["checkpoints"]] == [(2, 2), (3, 2)]  # and the last batch


def test_a_folder_of_other_records_is_refused(tiny_model, records, tmp_path):
    common = dict(evaluate=evaluate, batch=1, hparams=ROME_HP, edit_kwargs=kw(tiny_model, tmp_path), out_dir=tmp_path / "r")
    run_sequential(model=tiny_model, method=METHODS["rome"], records=records[:1], **common)
    with pytest.raises(ValueError, match=r"other \['case_ids'\]"):
        run_sequential(model=tiny_model, method=METHODS["rome"], records=records[1:], **common)
    with pytest.raises(ValueError, match=r"other \['method'\]"):  # a ROME folder resumed as MEMIT
        run_sequential(model=tiny_model, method=METHODS["memit"], records=records[:1], **common)
    with pytest.raises(ValueError, match=r"other \['hparams'\]"):
        run_sequential(model=tiny_model, method=METHODS["rome"], records=records[:1],
                       **{**common, "hparams": replace(ROME_HP, v_lr=0.5)})
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "records.jsonl").write_text('{"case_id": 1, "es": 1.0}\n')  # a per-record run's folder
    with pytest.raises(ValueError, match="another run's files"):
        run_sequential(model=tiny_model, method=METHODS["rome"], records=records[:1], **{**common, "out_dir": tmp_path / "plain"})


def test_max_minutes_stops_and_a_rerun_finishes(tiny_model, records, tmp_path):
    common = dict(records=records, evaluate=evaluate, batch=1, hparams=ROME_HP, edit_kwargs=kw(tiny_model, tmp_path),
                  out_dir=tmp_path / "r")
    first = run_sequential(model=tiny_model, method=METHODS["rome"], max_minutes=0, **common)
    assert not first["complete"] and first["checkpoints"] == [] and first["records"] == [] and first["model_restored"]
    done = run_sequential(model=tiny_model, method=METHODS["rome"], **common)
    assert done["complete"] and len(done["records"]) == 3


def test_bad_arguments_change_nothing(tiny_model, records, tmp_path):
    before = weights_hash(tiny_model)
    go = lambda **k: run_sequential(model=tiny_model, records=records, out_dir=tmp_path / "x", evaluate=evaluate, **k)  # noqa: E731
    with pytest.raises(ValueError, match="'none' method edits nothing"):
        go(method=get_method("none"))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch"):
            go(method=METHODS["rome"], batch=bad)
    with pytest.raises(ValueError, match="checkpoint_every 0"):
        go(method=METHODS["rome"], checkpoint_every=0)
    with pytest.raises(ValueError, match="repeat case_ids"):
        run_sequential(model=tiny_model, records=records + records[:1], out_dir=tmp_path / "y", evaluate=evaluate,
                       method=METHODS["rome"])
    assert weights_hash(tiny_model) == before


def test_cli_sequential_end_to_end_resume_and_collapse_figure(tiny_model, tmp_path, monkeypatch, capsys, tiny_wikitext):
    import tracer
    from benchmarks import compare, counterfact, runner

    monkeypatch.setattr(tracer, "load_model", lambda *a, **k: tiny_model)
    monkeypatch.setattr(runner, "edit_kwargs", lambda args: kw(tiny_model, tmp_path))
    out = tmp_path / "seq"
    argv = ["--method", "rome", "--sequential", "--batch", "1", "--n", "3", "--out", str(out),
            "--data", str(FIXTURES / "counterfact_tiny.json"), "--gen-tokens", "2", "--wikitext", str(tiny_wikitext),
            "--ppl-tokens", "40", "--hparam", "layer=1", "--hparam", "v_num_grad_steps=5", "--hparam", "kl_factor=0.0"]
    before = weights_hash(tiny_model)
    s = counterfact.main(argv)
    assert s["model_restored"] and weights_hash(tiny_model) == before
    assert s["sequential"]["checkpoints"] == 3 and s["sequential"]["complete"] and s["records_evaluated"] == 3
    assert "GE" in s["columns"]  # the final evaluation generates; the checkpoints do not
    last_ckpt = json.loads((out / CHECKPOINTS).read_text().splitlines()[-1])
    assert s["records_per_min"] == pytest.approx(60 * 3 / last_ckpt["seconds"])  # edits per minute of editing, not NaN
    assert s["perplexity"]["after"] == pytest.approx(json.loads((out / CHECKPOINTS).read_text().splitlines()[-1])["perplexity"])
    ckpts = [json.loads(l) for l in (out / CHECKPOINTS).read_text().splitlines()]
    assert [c["n_edits"] for c in ckpts] == [1, 2, 3] and all("perplexity" in c and "es" in c["metrics"] for c in ckpts)
    html = (out / "collapse.html").read_text()
    assert "edits so far" in html and "|dW| \\u002f |W| layer 1" in html  # plotly escapes the slash
    # rerun: nothing is computed again
    monkeypatch.setattr(runner, "get_method", lambda name: KillAfter(1))  # any compute now fails the test
    assert counterfact.main(argv)["sequential"]["checkpoints"] == 3
    compare.main([str(out), "--collapse", str(tmp_path / "both.html")])
    assert "edits so far" in (tmp_path / "both.html").read_text()


def test_cli_sequential_refuses_the_none_method_before_loading(tmp_path, monkeypatch):
    import tracer
    from benchmarks import counterfact

    monkeypatch.setattr(tracer, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match="'none' method edits nothing"):
        counterfact.main(["--method", "none", "--sequential", "--n", "2", "--out", str(tmp_path / "x"),
                          "--data", str(FIXTURES / "counterfact_tiny.json")])
    with pytest.raises(ValueError, match="batch 0"):
        counterfact.main(["--method", "rome", "--sequential", "--batch", "0", "--n", "2", "--out", str(tmp_path / "y"),
                          "--data", str(FIXTURES / "counterfact_tiny.json")])


def test_cli_checkpoint_flags_need_sequential(tmp_path, monkeypatch):
    import tracer
    from benchmarks import counterfact

    monkeypatch.setattr(tracer, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match="only apply with --sequential"):
        counterfact.main(["--method", "rome", "--checkpoint-every", "5", "--n", "2", "--out", str(tmp_path / "x"),
                          "--data", str(FIXTURES / "counterfact_tiny.json")])


def test_cli_sequential_final_generation_on_a_sample(tiny_model, tmp_path, monkeypatch, tiny_wikitext):
    # 500 edited records with generation cost hours on a CPU; --final-gen-sample N generates
    # for a seeded N of them and still scores ES/PS/NS on all.
    import tracer
    from benchmarks import counterfact, runner

    monkeypatch.setattr(tracer, "load_model", lambda *a, **k: tiny_model)
    monkeypatch.setattr(runner, "edit_kwargs", lambda args: kw(tiny_model, tmp_path))
    out = tmp_path / "seq"
    s = counterfact.main(["--method", "rome", "--sequential", "--batch", "3", "--n", "3", "--out", str(out),
                          "--data", str(FIXTURES / "counterfact_tiny.json"), "--gen-tokens", "2", "--ppl-tokens", "0",
                          "--wikitext", str(tiny_wikitext), "--final-gen-sample", "1", "--hparam", "layer=1", "--hparam", "v_num_grad_steps=3",
                          "--hparam", "kl_factor=0.0"])
    rows = [json.loads(l) for l in (out / "records.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all("es" in r and "ns" in r for r in rows)
    assert sum("ge" in r for r in rows) == 1 and s["columns"]["GE"]["n"] == 1
    assert "seeded sample of 1" in s["sequential"]["final_evaluation"]
    # the sample is named, so the unedited model can be scored on the same records (--case-ids)
    assert s["sequential"]["final_gen_case_ids"] == [r["case_id"] for r in rows if "ge" in r]


@pytest.mark.parametrize("extra, match", [
    (["--final-gen-sample", "2"], "only apply with --sequential"),
    (["--sequential", "--final-gen-sample", "0"], "must be an integer >= 1"),
])
def test_cli_final_gen_sample_bad_input_before_loading(extra, match, tmp_path, monkeypatch):
    import tracer
    from benchmarks import counterfact

    monkeypatch.setattr(tracer, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match=match):
        counterfact.main(["--method", "rome", "--n", "2", "--out", str(tmp_path / "x"),
                          "--data", str(FIXTURES / "counterfact_tiny.json"), *extra])


def test_zsre_refuses_final_gen_sample(tmp_path, monkeypatch):
    import tracer
    from benchmarks import zsre

    monkeypatch.setattr(tracer, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match="no generation to sample"):
        zsre.main(["--method", "rome", "--sequential", "--n", "2", "--out", str(tmp_path / "x"), "--final-gen-sample", "1",
                   "--data", str(FIXTURES / "zsre_tiny.json")])


def test_final_gen_sample_without_generation_is_refused(tmp_path, monkeypatch):
    import tracer
    from benchmarks import counterfact

    monkeypatch.setattr(tracer, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match="generates nothing"):
        counterfact.main(["--method", "rome", "--sequential", "--n", "2", "--out", str(tmp_path / "x"), "--no-generation",
                          "--final-gen-sample", "1", "--data", str(FIXTURES / "counterfact_tiny.json")])


def test_a_resumed_run_keeps_its_final_gen_sample(tiny_model, records, tmp_path):
    # the folder's manifest records N, so a rerun with another N cannot mix generated rows
    opts = dict(model=tiny_model, method=METHODS["rome"], records=records[:2], out_dir=tmp_path / "s", evaluate=evaluate,
                hparams=ROME_HP, edit_kwargs=kw(tiny_model, tmp_path), batch=2)
    run_sequential(**opts, final_gen_sample=1)
    with pytest.raises(ValueError, match="final_gen_sample"):
        run_sequential(**opts, final_gen_sample=2)
