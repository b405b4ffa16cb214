"""Benchmarks on Ray workers (`--ray`, `run_records(workers=)`) with the tiny model on a local
2-worker cluster: the same rows as the single-process run, for ROME one record at a time,
a batched method and the unedited baseline; `--sequential` refuses `--ray` before loading.

Skips, visibly, when `ray` is not installed.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import counterfact, runner
from benchmarks.counterfact import CounterFactEval
from benchmarks.data import load_counterfact
from tests.benchmarks.fakes import RankOneMethod
from tests.conftest import FIXTURES
from tests.tracer.ray_models import LOADER, local_pool

TIMES = ("seconds", "edit_seconds")


@pytest.fixture(scope="module")
def pool():
    yield from local_pool()


@pytest.fixture(scope="module")
def model():
    from tests.tracer.ray_models import tiny
    from tracer.model import load_any

    return load_any("tiny", loader=tiny)


def untimed(rows):
    return [{k: v for k, v in r.items() if k not in TIMES} for r in rows]


def assert_same_rows(a, b):
    a, b = untimed(a), untimed(b)
    assert [r["case_id"] for r in a] == [r["case_id"] for r in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float):
                assert x[k] == pytest.approx(y[k], abs=1e-6), k
            else:
                assert x[k] == y[k], k


def test_sequential_refuses_ray_before_the_model_loads(tmp_path, monkeypatch):
    import tracer

    monkeypatch.setattr(tracer, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["--method", "rome", "--n", "2", "--out", str(tmp_path), "--data", str(FIXTURES / "counterfact_tiny.json"),
            "--sequential", "--ray", "local", "--workers", "2"]
    with pytest.raises(ValueError, match="--sequential.*cannot be split across workers"):
        counterfact.main(argv)
    with pytest.raises(ValueError, match="--workers 2 needs --ray"):
        counterfact.main([*argv[:8], "--workers", "2"])


@pytest.mark.parametrize("method, batch", [("rank-one", None), ("rank-one", 2), ("none", None)])
def test_run_records_on_workers_gives_the_single_process_rows(pool, model, tmp_path, method, batch):
    records = load_counterfact(FIXTURES / "counterfact_tiny.json")
    method = RankOneMethod() if method == "rank-one" else runner.NoEdit()
    kw = dict(method=method, records=records, evaluate=CounterFactEval(gen_tokens=3), batch=batch,
              perplexity=_w_norm, ppl_every=1)  # "perplexity": any function of the edited model
    one = runner.run_records(model=model, out_dir=tmp_path / "one", **kw)
    many = runner.run_records(model=model, out_dir=tmp_path / "many", workers=pool, **kw)
    assert_same_rows(one, many)
    assert all("ppl_after" in r for r in many if "edit_seconds" in r)  # measured inside the workers
    written = [json.loads(x)["case_id"] for x in (tmp_path / "many" / runner.RECORDS).read_text().splitlines()]
    assert sorted(written) == [101, 102, 103]  # the driver wrote each once
    assert not any("model_restored" in r for r in many)  # every worker reported its model restored


def _w_norm(model) -> float:
    from tracer.model import w_out

    return float(w_out(model, 0).abs().mean())


def test_counterfact_rome_with_ray_gives_the_single_process_rows(pool, model, tmp_path, monkeypatch, tiny_wikitext):
    import tracer
    from tests.tracer.ray_models import KeepOpen
    from tracer import workers

    monkeypatch.setattr(tracer, "load_model", lambda *a, **k: model)
    asked = []
    monkeypatch.setattr(workers, "pool_from_args",
                        lambda args: None if args.ray is None else asked.append((args.ray, args.workers)) or KeepOpen(pool))
    argv = ["--model", "tiny", "--model-loader", LOADER, "--method", "rome", "--n", "3", "--gen-tokens", "3",
            "--data", str(FIXTURES / "counterfact_tiny.json"), "--wikitext", str(tiny_wikitext), "--ppl-tokens", "40",
            "--ppl-every", "2", "--threads", "1"]
    for hp in ("layer=1", "v_lr=1.0", "v_num_grad_steps=5", "clamp_norm_factor=50.0", "kl_factor=0.0",
               "context_lengths=[[4,2]]", "mom2_n_tokens=300"):
        argv += ["--hparam", hp]
    one = counterfact.main([*argv, "--out", str(tmp_path / "one"), "--cache-dir", str(tmp_path / "c1")])
    many = counterfact.main([*argv, "--out", str(tmp_path / "many"), "--cache-dir", str(tmp_path / "c2"),
                             "--ray", "local", "--workers", "2"])
    assert asked == [("local", 2)]
    assert many["model_restored"] and many["records_evaluated"] == 3
    assert_same_rows(runner.read_rows(tmp_path / "one" / runner.RECORDS, repair=False),
                     sorted(runner.read_rows(tmp_path / "many" / runner.RECORDS), key=lambda r: r["case_id"]))
    assert one["columns"].keys() == many["columns"].keys()
    assert all(one["columns"][c]["mean"] == pytest.approx(many["columns"][c]["mean"], abs=1e-4) for c in one["columns"])
    assert list((tmp_path / "c2" / "stats").rglob("*.safetensors"))  # the workers computed the key statistics


def test_a_worker_that_does_not_restore_is_reported(pool, model, tmp_path):
    records = load_counterfact(FIXTURES / "counterfact_tiny.json")[:1]
    rows = runner.run_records(model=model, method=Leaky(), records=records, out_dir=tmp_path,
                              evaluate=CounterFactEval(gen_tokens=0), workers=pool)
    assert rows[0]["model_restored"] is False
    pool.close()  # this pool's workers now hold an edited model: no later test may use it


class Leaky(RankOneMethod):
    """A method whose edit is never undone (restore does nothing)."""

    def edit_many(self, model, requests, hparams=None):
        res = super().edit_many(model, requests, hparams)
        res.restore = lambda: None
        return res
