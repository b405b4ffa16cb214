"""What a Ray worker pool costs per task, apart from the work (a script, not a test).

`trace_dataset(..., workers=pool)` sends each fact to a worker and gets its `traces.jsonl`
line back; `run_records` does the same with CounterFact records. Besides the tracing
itself, every task pays for a round trip: pickling the task, Ray's scheduling of the actor
call, the result's way back and the driver's `ray.wait`. This script measures that cost
alone, with tasks that do no work: each returns a payload the size of a real result line
(12.8 kB on average for the whole-known_1000 Gemma-3-270m trace, 32.5 kB at most).

It starts the same pool the tracing runs use, then times:

- **throughput**: `--tasks` no-op tasks through `pool.map` with every worker busy; the
  overhead per task is `wall time x workers / tasks` (worker-seconds each task costs; an
  upper bound, since with no work the driver's own loop may be what keeps a worker waiting);
- **latency**: one task at a time, `--latency-n` times (the round trip of one call).

Run:
    python -m benchmarks.ray_overhead --workers 2 --worker-threads 1 --tasks 500
    python -m benchmarks.ray_overhead --ray auto --workers 8      # on a running cluster

Prints the start-up time, both overheads in milliseconds and the overhead as a share of a
task of `--task-s` seconds (default 78.8 s: one Gemma-3-270m fact on one worker thread,
docs/scaling.md); `--json` also writes them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def no_op(model, task: dict) -> bytes:
    """A task that does no work and returns `task["payload"]` bytes, like a result line."""
    return b"x" * task["payload"]


def overhead(pool, *, tasks: int, payload: int, latency_n: int) -> dict:
    """Time `tasks` no-op tasks through `pool.map` and `latency_n` single round trips.

    Args:
        pool: a started `tracer.workers.WorkerPool` (or anything with `map` and `n_workers`).
        tasks: no-op tasks for the throughput measurement (>= 1).
        payload: bytes each task returns.
        latency_n: single-task round trips timed one after another (0: none).

    Returns:
        `{"tasks", "workers", "payload_bytes", "wall_s", "per_task_ms"}`, where `per_task_ms`
        is worker-milliseconds per task (`wall x workers / tasks`), plus `"latency_ms"`
        (median, min, max of the round trips) when `latency_n` > 0.

    Raises:
        ValueError: `tasks` < 1, a negative `payload` or `latency_n`, or a task that came back
            with the wrong size (a broken round trip).
    """
    if tasks < 1 or payload < 0 or latency_n < 0:
        raise ValueError(f"tasks {tasks} must be >= 1, payload {payload} and latency_n {latency_n} >= 0")
    work = [{"payload": payload}] * tasks
    t = time.perf_counter()
    got = sum(len(r) for _, r in pool.map(no_op, work))
    wall = time.perf_counter() - t
    if got != tasks * payload:
        raise ValueError(f"the tasks returned {got} bytes, not {tasks * payload}")
    out = {"tasks": tasks, "workers": pool.n_workers, "payload_bytes": payload, "wall_s": wall,
           "per_task_ms": wall * pool.n_workers / tasks * 1e3}
    if latency_n:
        times = []
        for _ in range(latency_n):
            t = time.perf_counter()
            for _ in pool.map(no_op, work[:1]):
                pass
            times.append((time.perf_counter() - t) * 1e3)
        out["latency_ms"] = {"median": statistics.median(times), "min": min(times), "max": max(times)}
    return out


def main(argv=None) -> dict:
    """Run `python -m benchmarks.ray_overhead`; see the module docstring.

    Returns:
        The numbers printed (also written to `--json`): `overhead`'s dict plus `start_s`, the
        pool's start-up (Ray and the workers loading their models), and `share_of_task`.

    Raises:
        SystemExit: bad arguments (argparse exits with status 2).
        ImportError: Ray is not installed (`pip install "romelens[ray]"`).
    """
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m", help="what each worker loads (as in python -m tracer)")
    ap.add_argument("--ray", default="local", metavar="ADDRESS", help="'local' (default), 'auto' or a cluster address")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--worker-threads", type=int, default=1)
    ap.add_argument("--tasks", type=int, default=500)
    ap.add_argument("--payload", type=int, default=12835, help="bytes each task returns (default: the mean Gemma trace line)")
    ap.add_argument("--latency-n", type=int, default=50)
    ap.add_argument("--task-s", type=float, default=78.8, help="seconds of work in one real task, for the share")
    ap.add_argument("--json", help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)
    if args.tasks < 1 or args.workers < 1 or args.worker_threads < 1 or args.payload < 0 or args.latency_n < 0:
        ap.error("--tasks, --workers and --worker-threads must be >= 1, --payload and --latency-n >= 0")

    from tracer.workers import WorkerPool  # noqa: PLC0415

    t = time.perf_counter()
    with WorkerPool(model=args.model, workers=args.workers, threads=args.worker_threads,
                    cpus_per_worker=args.worker_threads, address=args.ray) as pool:
        start = time.perf_counter() - t
        out = overhead(pool, tasks=args.tasks, payload=args.payload, latency_n=args.latency_n)
    out.update(start_s=start, model=args.model, worker_threads=args.worker_threads,
               share_of_task=out["per_task_ms"] / 1e3 / args.task_s, task_s=args.task_s)
    print(f"pool of {out['workers']} workers ({args.model}, {args.worker_threads} thread each) started in {start:.1f} s")
    print(f"{args.tasks} no-op tasks returning {args.payload} bytes: {out['wall_s']:.2f} s, "
          f"{out['per_task_ms']:.2f} worker-ms per task ({100 * out['share_of_task']:.4f}% of a {args.task_s:g} s task)")
    if "latency_ms" in out:
        lat = out["latency_ms"]
        print(f"one task at a time ({args.latency_n}x): round trip median {lat['median']:.2f} ms (min {lat['min']:.2f}, max {lat['max']:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
