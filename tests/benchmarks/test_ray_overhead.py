"""benchmarks.ray_overhead without Ray: an in-process stand-in for the pool (the real pool's
round trip is tested in tests/tracer/test_workers.py)."""

from __future__ import annotations

import json

import pytest

from benchmarks import ray_overhead


class InProcessPool:
    """`map` and `n_workers` as `WorkerPool` has them, running each task here."""

    n_workers = 2

    def __init__(self, *, corrupt: bool = False, **kw):
        self.kw, self.corrupt, self.closed = kw, corrupt, False

    def map(self, fn, tasks):
        for i, t in enumerate(tasks):
            r = fn(None, t)
            yield i, r[:-1] if self.corrupt else r

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.closed = True


def test_overhead_counts_every_task_and_payload():
    out = ray_overhead.overhead(InProcessPool(), tasks=7, payload=300, latency_n=3)
    assert out["tasks"] == 7 and out["payload_bytes"] == 300 and out["workers"] == 2
    assert out["per_task_ms"] == pytest.approx(out["wall_s"] * 2 / 7 * 1e3)
    assert set(out["latency_ms"]) == {"median", "min", "max"}
    assert "latency_ms" not in ray_overhead.overhead(InProcessPool(), tasks=1, payload=0, latency_n=0)


def test_a_short_result_is_reported_not_timed():
    with pytest.raises(ValueError, match="returned 6 bytes, not 9"):
        ray_overhead.overhead(InProcessPool(corrupt=True), tasks=3, payload=3, latency_n=0)


@pytest.mark.parametrize("bad", [{"tasks": 0}, {"payload": -1}, {"latency_n": -1}])
def test_bad_counts_are_refused(bad):
    with pytest.raises(ValueError, match="must be"):
        ray_overhead.overhead(InProcessPool(), **({"tasks": 2, "payload": 1, "latency_n": 0} | bad))


def test_main_starts_the_pool_it_is_asked_for_and_writes_json(tmp_path, monkeypatch, capsys):
    from tracer import workers

    made = []
    monkeypatch.setattr(workers, "WorkerPool", lambda **kw: made.append(InProcessPool(**kw)) or made[-1])
    out = ray_overhead.main(["--workers", "2", "--worker-threads", "1", "--tasks", "4", "--latency-n", "1",
                             "--task-s", "10", "--json", str(tmp_path / "o.json")])
    assert made[0].kw == {"model": "gemma-3-270m", "workers": 2, "threads": 1, "cpus_per_worker": 1, "address": "local"}
    assert made[0].closed
    assert json.loads((tmp_path / "o.json").read_text())["share_of_task"] == pytest.approx(out["per_task_ms"] / 1e4)
    assert "worker-ms per task" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--tasks", "0"], ["--workers", "0"], ["--payload", "-1"]])
def test_main_refuses_bad_arguments(args):
    with pytest.raises(SystemExit):
        ray_overhead.main(args)
