"""Ray workers (tracer.workers) on a local 2-worker cluster with the tiny model: dataset tracing
identical to the single-process run, resume, an interrupted driver, a killed worker, key
statistics as a map-reduce; and that nothing imports Ray unless asked.

The Ray tests share one local cluster (2 CPUs, 2 workers of 1 thread) and skip, visibly,
when `ray` is not installed (`pip install "romelens[ray]"`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tracer.ray_models import LOADER, local_pool
from tracer.dataset import trace_dataset
from tracer.layer import choose_from_result
from tracer.noise import NoiseScale
from tracer.workers import WorkerPool, ray_available

ROOT = Path(__file__).resolve().parents[2]
needs_ray = pytest.mark.skipif(not ray_available(), reason='Ray is not installed (pip install "romelens[ray]")')
WRONG = "zzzz-not-the-answer"
FACTS = [
    {"known_id": 0, "prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower", "attribute": None},
    {"known_id": 1, "prompt": "Berlin is a city in", "subject": "Berlin", "attribute": WRONG},
    {"known_id": 2, "prompt": "The Colosseum is located in the city of", "subject": "Colosseum", "attribute": None},
    {"known_id": 3, "prompt": "Tokyo is the capital of", "subject": "Tokyo", "attribute": None},
    {"known_id": 4, "prompt": "Danielle Darrieux speaks the language", "subject": "Danielle Darrieux", "attribute": None},
    {"known_id": 5, "prompt": "Apple was founded by", "subject": "Apple", "attribute": WRONG},
    {"known_id": 6, "prompt": "Michael Jordan plays the sport of", "subject": "Michael Jordan", "attribute": None},
    {"known_id": 7, "prompt": "The Louvre is located in the city of", "subject": "Louvre", "attribute": None},
    {"known_id": 8, "prompt": "Toko Yasuda plays the instrument", "subject": "Toko Yasuda", "attribute": None},
    {"known_id": 9, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux", "attribute": None},
]
OPTS = dict(kinds=("resid", "mlp", "attn"), samples=2, window=2, noise=NoiseScale(value=3.0), progress=False)


def lines(folder) -> list[dict]:
    return [json.loads(x) for x in (Path(folder) / "traces.jsonl").read_text().splitlines()]


def by_id(rows) -> dict:
    ids = [str(r["known_id"]) for r in rows]
    assert len(ids) == len(set(ids)), f"a fact written twice: {ids}"
    return {i: r for i, r in zip(ids, rows)}


def assert_same_traces(a_rows, b_rows):
    """Same facts, same lines; every per-fact score within 1e-6."""
    a, b = by_id(a_rows), by_id(b_rows)
    assert a.keys() == b.keys()
    for i in a:
        ra, rb = a[i], b[i]
        assert {k: v for k, v in ra.items() if k not in ("scores", "high", "low")} == \
            {k: v for k, v in rb.items() if k not in ("scores", "high", "low")}, i
        if ra["correct"]:
            assert ra["high"] == pytest.approx(rb["high"], abs=1e-6) and ra["low"] == pytest.approx(rb["low"], abs=1e-6)
            for k in ra["scores"]:
                x = torch.tensor([[float("nan") if v is None else v for v in row] for row in ra["scores"][k]])
                y = torch.tensor([[float("nan") if v is None else v for v in row] for row in rb["scores"][k]])
                assert torch.allclose(x, y, atol=1e-6, rtol=0, equal_nan=True), (i, k)


def assert_same_result(a, b):
    assert (a.known_ids, a.n_tried, a.n_dropped) == (b.known_ids, b.n_tried, b.n_dropped)
    for k in a.kinds:
        assert torch.allclose(a.mean(k), b.mean(k), atol=1e-6, equal_nan=True)
        assert torch.allclose(a.ci(k), b.ci(k), atol=1e-6, equal_nan=True)
    assert choose_from_result(a).layer == choose_from_result(b).layer


# ------------------------------------------------------------------ without Ray


def test_importing_romelens_does_not_import_ray():
    code = ("import sys, tracer, tracer.dataset, tracer.workers, tracer.__main__, editor, editor.stats, benchmarks, "
            "benchmarks.runner, benchmarks.counterfact, benchmarks.zsre; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_pool_options_are_checked_before_ray_starts():
    for bad in (dict(workers=0), dict(workers=True), dict(threads=0), dict(cpus_per_worker=0), dict(restarts=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            WorkerPool(model="tiny", **bad)


def test_ray_options_are_refused_where_they_do_not_apply(tmp_path, monkeypatch):
    from tracer.__main__ import main

    with pytest.raises(SystemExit):  # a single prompt is traced here, not on workers
        main(["--prompt", "The Eiffel Tower is in", "--subject", "Eiffel Tower", "--ray", "local"])
    with pytest.raises(SystemExit):
        main(["--facts", "x.json", "--workers", "2"])


def test_pool_from_args_passes_the_options(monkeypatch):
    import argparse

    from tracer import workers
    from tracer.workers import add_ray_args, pool_from_args

    got = {}
    monkeypatch.setattr(workers, "WorkerPool", lambda **kw: got.update(kw) or "pool")
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--model-loader")
    add_ray_args(p)
    assert pool_from_args(p.parse_args(["--model", "m"])) is None
    args = p.parse_args(["--model", "m", "--model-loader", LOADER, "--ray", "auto", "--workers", "3", "--worker-threads", "2"])
    assert pool_from_args(args) == "pool"
    assert got == dict(model="m", loader=LOADER, workers=3, cpus_per_worker=2, threads=2, address="auto")
    with pytest.raises(ValueError, match="--workers 3 needs --ray"):
        pool_from_args(p.parse_args(["--model", "m", "--workers", "3"]))


# ------------------------------------------------------------------ on a local cluster


@pytest.fixture(scope="module")
def pool():
    yield from local_pool()
    import ray

    assert not ray.is_initialized()  # the pool started the cluster, so it shut it down


@pytest.fixture(scope="module")
def model():
    from tests.tracer.ray_models import tiny
    from tracer.model import load_any

    return load_any("tiny", loader=tiny)


@pytest.fixture(scope="module")
def single(model, tmp_path_factory):
    """The single-process run of FACTS: its result and its folder."""
    out = tmp_path_factory.mktemp("single")
    return trace_dataset(model, FACTS, out=out, **OPTS), out


@needs_ray
def test_workers_load_the_same_model(pool, model):
    from tracer import weights_hash

    assert len(pool.info) == 2 and len({i["pid"] for i in pool.info}) == 2
    assert all(i["weights_hash"] == weights_hash(model) and i["threads"] == 1 and i["device"] == "cpu" for i in pool.info)
    pool.check_model(model)


@needs_ray
def test_trace_dataset_on_workers_equals_the_single_process_run(pool, model, single, tmp_path):
    ref, ref_out = single
    res = trace_dataset(model, FACTS, out=tmp_path, workers=pool, **OPTS)
    assert res.n_facts == 8 and res.n_dropped == 2
    assert_same_result(ref, res)
    assert_same_traces(lines(ref_out), lines(tmp_path))  # each line carries its known_id, once


@needs_ray
def test_n_sends_only_the_first_known_facts_and_a_rerun_resumes(pool, model, single, tmp_path):
    ref3 = trace_dataset(model, FACTS, n=3, **OPTS)
    got3 = trace_dataset(model, FACTS, n=3, out=tmp_path, workers=pool, **OPTS)
    assert got3.known_ids == ref3.known_ids == (0, 2, 3) and got3.n_dropped == 1
    assert sorted(r["known_id"] for r in lines(tmp_path)) == [0, 1, 2, 3]  # nothing past the third known fact
    first = (tmp_path / "traces.jsonl").read_bytes()
    full = trace_dataset(model, FACTS, out=tmp_path, workers=pool, **OPTS)
    assert (tmp_path / "traces.jsonl").read_bytes().startswith(first)  # the done facts were not sent again
    assert_same_result(single[0], full)
    assert_same_traces(lines(single[1]), lines(tmp_path))


@needs_ray
def test_an_interrupted_driver_leaves_a_resumable_folder(pool, model, single, tmp_path, monkeypatch):
    import tracer.dataset as dataset

    real, calls = dataset.append_jsonl, []

    def append(path, row):
        calls.append(row["known_id"])
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C while results come in
        real(path, row)

    monkeypatch.setattr(dataset, "append_jsonl", append)
    with pytest.raises(KeyboardInterrupt):
        trace_dataset(model, FACTS, out=tmp_path, workers=pool, **OPTS)
    assert len(lines(tmp_path)) == 3
    monkeypatch.setattr(dataset, "append_jsonl", real)
    res = trace_dataset(model, FACTS, out=tmp_path, workers=pool, **OPTS)
    assert_same_result(single[0], res)
    assert_same_traces(lines(single[1]), lines(tmp_path))


@needs_ray
def test_a_killed_worker_loses_no_fact_and_writes_none_twice(pool, model, single, tmp_path, monkeypatch):
    import tracer.dataset as dataset

    real, killed = dataset.append_jsonl, []
    deaths = pool.deaths

    def append(path, row):
        real(path, row)
        if not killed:  # the first result is in and the next facts are out: kill a worker
            pid = pool.pids()[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    monkeypatch.setattr(dataset, "append_jsonl", append)
    res = trace_dataset(model, FACTS, out=tmp_path, workers=pool, **OPTS)
    assert pool.deaths == deaths + 1 and pool.resent >= 1  # the dead worker's fact was sent again
    assert killed[0] not in pool.pids()  # a fresh worker took its place
    assert_same_result(single[0], res)
    assert_same_traces(lines(single[1]), lines(tmp_path))  # complete, no known_id twice


@needs_ray
def test_a_pool_larger_than_the_cluster_is_refused_not_left_pending(pool):
    import ray

    cpus = ray.cluster_resources()["CPU"]
    with pytest.raises(ValueError, match=f"need {cpus + 2:g} CPUs"):
        WorkerPool(model="tiny", workers=int(cpus) + 2, cpus_per_worker=1)
    with pytest.raises(ValueError, match="GPU"):
        WorkerPool(model="tiny", workers=1, gpus_per_worker=1)
    assert ray.is_initialized() and len(pool.pids()) == 2  # the running cluster and its pool are left alone


@needs_ray
def test_a_failing_task_raises_in_the_driver(pool):
    from tests.tracer.ray_models import refuse

    with pytest.raises(ValueError, match="task 'x' refused"):
        list(pool.map(refuse, ["x"]))


@needs_ray
def test_map_yields_every_task_once_on_both_workers(pool):
    from tests.tracer.ray_models import pid

    got = list(pool.map(pid, range(6)))
    assert sorted(i for i, _ in got) == list(range(6))
    assert {p for _, p in got} <= set(pool.pids())


@needs_ray
def test_ray_overhead_round_trips_payloads_through_the_pool(pool):
    from benchmarks.ray_overhead import overhead

    out = overhead(pool, tasks=10, payload=1000, latency_n=2)
    assert out["tasks"] == 10 and out["workers"] == 2 and out["per_task_ms"] > 0
    assert out["latency_ms"]["min"] <= out["latency_ms"]["median"] <= out["latency_ms"]["max"]


@needs_ray
def test_cli_traces_facts_on_workers(pool, model, single, tmp_path, monkeypatch, capsys):
    from tests.tracer.ray_models import KeepOpen
    from tracer import workers
    from tracer.__main__ import main

    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(FACTS))
    asked = []
    monkeypatch.setattr(workers, "pool_from_args", lambda args: asked.append((args.ray, args.workers)) or KeepOpen(pool))
    out = tmp_path / "run"
    argv = ["--model", "tiny", "--model-loader", LOADER, "--facts", str(facts), "--samples", "2", "--window", "2",
            "--noise", "3", "--kinds", "mlp", "--out", str(out), "-q", "--ray", "local", "--workers", "2"]
    assert main(argv) == 0
    assert asked == [("local", 2)]
    assert "kept 8 the model gets right, dropped 2" in capsys.readouterr().out
    assert sorted(r["known_id"] for r in lines(out)) == list(range(10))


@needs_ray
def test_layer_stats_on_workers_match_the_single_process_file(pool, model, tmp_path):
    from safetensors import safe_open

    from editor.stats import layer_stats, stats_path

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"{s}." for s in [f["prompt"] for f in FACTS] * 12))
    kw = dict(corpus=str(corpus), n_tokens=700, seq_len=16, batch_size=2, progress=False)
    one = layer_stats(model, [0, 2], cache_dir=tmp_path / "one", **kw)
    many = layer_stats(model, [0, 2], cache_dir=tmp_path / "many", workers=pool, shard_batches=3, **kw)
    for l in (0, 2):
        a, b = stats_path(model, l, corpus=str(corpus), n_tokens=700, cache_dir=tmp_path / "one"), \
            stats_path(model, l, corpus=str(corpus), n_tokens=700, cache_dir=tmp_path / "many")
        with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
            assert fa.metadata() == fb.metadata() and fa.metadata()["n_tokens"] == "700"
            assert torch.allclose(fa.get_tensor("mom2"), fb.get_tensor("mom2"), rtol=1e-6, atol=1e-6 * float(one[l].abs().max()))
        assert torch.allclose(one[l], many[l], rtol=1e-6, atol=1e-6 * float(one[l].abs().max()))
        assert not torch.equal(one[l], torch.zeros_like(one[l]))


def test_check_model_refuses_a_driver_in_another_dtype(tiny_model):
    # No Ray needed: check_model reads only the workers' reported info.
    import copy

    from tracer.model import cast_model, model_name, weights_hash
    from tracer.workers import WorkerPool

    pool = WorkerPool.__new__(WorkerPool)
    pool.info = [{"model_name": model_name(tiny_model), "n_layers": tiny_model.cfg.n_layers, "dtype": "torch.float32",
                  "weights_hash": weights_hash(tiny_model)}]
    pool.check_model(tiny_model)  # the same model: accepted
    with pytest.raises(ValueError, match="bfloat16"):
        pool.check_model(cast_model(copy.deepcopy(tiny_model), "bfloat16"))
