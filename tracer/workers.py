"""Ray workers: many processes (or machines, or GPUs) that each hold the model and serve tasks.

Everything Ray-specific in romelens is in this module, and Ray is imported only inside its
functions, so `tracer`, `editor` and `benchmarks` never import Ray unless a pool is made.
Install it with `pip install "romelens[ray]"`.

A `WorkerPool` starts `workers` Ray actors. Each loads the model once, by name through
`tracer.load_model` or through your loader (`tracer.model.load_any`'s conventions: a
`"module:function"` string or a callable, importable in the worker processes), onto its
own device (its GPU when it was given one, else the CPU with `threads` torch threads),
and then serves many tasks. `pool.map(fn, tasks)` runs `fn(model, task)` on the workers
and yields `(index, result)` in completion order.

Faults: a task whose worker dies (killed, out of memory, its node lost) is sent again, to
a live worker or to a fresh one started in its place (up to `restarts` per worker slot);
each task's result is yielded exactly once, so a driver that writes what `map` yields
writes every task once. A task that fails with an ordinary exception re-raises it in the
driver. `tracer.dataset.trace_dataset`, `benchmarks.runner.run_records` and
`editor.stats.layer_stats` take `workers=pool`; docs/scaling.md shows the command lines.

Example:
    >>> from tracer.workers import WorkerPool
    >>> with WorkerPool(model="gemma-3-270m", workers=2, threads=1, address="local") as pool:
    ...     ds = trace_dataset(model, "known_1000.json", n=50, out="runs/k50", workers=pool)
"""

from __future__ import annotations

import collections
import logging
import math
import os
import socket
import time
from typing import Any, Callable, Iterable, Iterator

log = logging.getLogger(__name__)

LOCAL = "local"
TASK_RETRIES = 3  # sends of one task after its worker died, before the pool gives up on it
RESTARTS = 2  # fresh workers started in one slot after the one there died
READY_TIMEOUT_S = 900  # a worker that has not loaded its model by then is reported, not waited on for ever


def ray_available() -> bool:
    """Whether the `ray` package can be imported (without importing it)."""
    import importlib.util  # noqa: PLC0415

    return importlib.util.find_spec("ray") is not None


def _ray():
    try:
        import ray  # noqa: PLC0415
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError('workers need Ray: pip install "romelens[ray]" (or pip install "ray>=2.9")') from err
    return ray


def model_identity(model) -> dict:
    """What a worker reports of its model and `WorkerPool.check_model` compares with the driver's:
    `{"model_name", "n_layers", "dtype"}` (the weights themselves are compared by hash, loosely)."""
    from tracer.model import model_dtype, model_name  # noqa: PLC0415

    return {"model_name": model_name(model), "n_layers": int(model.cfg.n_layers), "dtype": str(model_dtype(model))}


class _Worker:
    """The actor body: one model, loaded once, serving `run(fn, task)` calls."""

    def __init__(self, spec: str, loader, device: str | None, threads: int):
        import torch  # noqa: PLC0415

        from tracer.model import load_any, weights_hash  # noqa: PLC0415

        if threads > 0:
            torch.set_num_threads(threads)
        if device is None:
            import ray  # noqa: PLC0415

            device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.model = load_any(spec, loader=loader, device=device)
        self._info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "device": device,
            "threads": torch.get_num_threads(),
            **model_identity(self.model),
            "weights_hash": weights_hash(self.model),
        }

    def info(self) -> dict:
        return self._info

    def run(self, fn: Callable, task: Any) -> Any:
        return fn(self.model, task)


class WorkerPool:
    """Ray actors that each hold the model and run `fn(model, task)` for the driver.

    Args:
        model: the model spec each worker loads (`--model`: a TransformerLens name, the offline
            default, a local Hugging Face folder, or what `loader` takes).
        loader: None (`tracer.load_model`), or a loader as in `tracer.model.load_any`: a
            `"module:function"` string or a callable, importable in the worker processes.
        workers: the number of actors; None is one per GPU of the cluster when it has GPUs,
            else one per `cpus_per_worker` CPUs.
        cpus_per_worker: CPUs Ray reserves for each actor.
        threads: torch CPU threads in each actor (None: `cpus_per_worker`).
        gpus_per_worker: GPUs per actor; None is 1 when the cluster has a GPU, else 0. An
            actor with a GPU puts its model there (`device`, unless given).
        device: the workers' torch device; None picks the actor's GPU or the CPU.
        address: `"local"` starts a Ray instance on this machine (with
            `workers * cpus_per_worker` CPUs); `"auto"` or an address (`"HOST:6379"`,
            `"ray://HOST:10001"`) connects to a running cluster (`ray start --head`); None
            uses the instance already initialised in this process, else starts a local one.
        restarts: fresh actors started in one worker slot after the one there died.
        task_retries: sends of one task after a worker died under it, before `map` raises.
        runtime_env: passed to `ray.init` (e.g. `{"working_dir": "."}` on a cluster whose
            nodes lack romelens).

    Raises:
        ValueError: `workers`, `cpus_per_worker`, `threads`, `restarts` or `task_retries`
            out of range; a worker that fails to load the model (its error is in the message).
        ImportError: Ray is not installed.

    Example:
        >>> with WorkerPool(model="gemma-3-270m", workers=2, address="local") as pool:
        ...     for i, n in pool.map(lambda model, p: len(model.to_tokens(p)[0]), ["a b", "c"]):
        ...         print(i, n)
    """

    def __init__(
        self,
        *,
        model: str,
        loader: str | Callable | None = None,
        workers: int | None = None,
        cpus_per_worker: float = 1,
        threads: int | None = None,
        gpus_per_worker: float | None = None,
        device: str | None = None,
        address: str | None = LOCAL,
        restarts: int = RESTARTS,
        task_retries: int = TASK_RETRIES,
        runtime_env: dict | None = None,
    ):
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers {workers!r} must be None or an integer >= 1")
        if not cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker {cpus_per_worker!r} must be > 0")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads {threads!r} must be None or an integer >= 1")
        for name, v in (("restarts", restarts), ("task_retries", task_retries)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} {v!r} must be an integer >= 0")
        ray = _ray()
        self.spec, self.loader, self.device = model, loader, device
        self.threads = threads if threads is not None else max(1, int(cpus_per_worker))
        self.cpus_per_worker = cpus_per_worker
        self.restarts, self.task_retries = restarts, task_retries
        self.deaths = 0  # workers seen dead
        self.resent = 0  # tasks sent again after their worker died
        self._owns_ray = False
        if not ray.is_initialized():
            if address in (None, LOCAL):
                n_cpus = None if workers is None else max(1, math.ceil(workers * cpus_per_worker))
                ray.init(num_cpus=n_cpus, include_dashboard=False, runtime_env=runtime_env)
            else:
                ray.init(address=address, runtime_env=runtime_env)
            self._owns_ray = True
        elif address not in (None, LOCAL):
            log.info("Ray is already initialised in this process; address %r is not used", address)
        res = ray.cluster_resources()
        if gpus_per_worker is None:
            gpus_per_worker = 1 if res.get("GPU", 0) >= 1 else 0
        self.gpus_per_worker = gpus_per_worker
        if workers is None:
            workers = int(res.get("GPU", 0) // gpus_per_worker) if gpus_per_worker else int(res.get("CPU", 1) // cpus_per_worker)
            workers = max(1, workers)
        for kind, per in (("CPU", cpus_per_worker), ("GPU", gpus_per_worker)):
            if per and workers * per > res.get(kind, 0) + 1e-9:  # Ray would leave the rest pending for ever
                if self._owns_ray:
                    ray.shutdown()
                raise ValueError(f"{workers} workers x {per} {kind} each need {workers * per:g} {kind}s; the Ray "
                                 f"cluster has {res.get(kind, 0):g}: ask for fewer workers or less per worker")
        self.n_workers = workers
        self._cls = ray.remote(_Worker)
        self._slots: list = [None] * workers
        self._info_refs: list = [None] * workers
        self._restarts_left = [restarts] * workers
        self.info: list[dict] = []
        try:
            for s in range(workers):
                self._start(s)
            self.info = [self._ready(s) for s in range(workers)]
        except BaseException:
            self.close()
            raise
        log.info("%d workers ready: %s", workers, [(i["host"], i["pid"], i["device"]) for i in self.info])

    # ---------------------------------------------------------------- actors

    def _start(self, s: int) -> None:
        """Start an actor in slot `s`, and ask for its report (`info`) before any task."""
        env = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        opts = dict(num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker, max_restarts=0,
                    max_task_retries=0, runtime_env={"env_vars": env})
        actor = self._cls.options(**opts).remote(self.spec, self.loader, self.device, self.threads)
        self._slots[s] = actor
        self._info_refs[s] = actor.info.remote()

    def _ready(self, s: int) -> dict:
        ray = _ray()
        try:
            return ray.get(self._info_refs[s], timeout=READY_TIMEOUT_S)
        except ray.exceptions.RayActorError as err:
            raise ValueError(f"a worker could not load model {self.spec!r} (loader {self.loader!r}): {err}") from err
        except ray.exceptions.GetTimeoutError as err:
            raise RuntimeError(f"worker {s} was not ready after {READY_TIMEOUT_S} s: the cluster may lack free "
                               f"resources ({self.cpus_per_worker} CPU, {self.gpus_per_worker} GPU per worker) "
                               "or the model load hangs") from err

    @property
    def model_name(self) -> str:
        """The workers' model name (`tracer.model.model_name`)."""
        return self.info[0]["model_name"]

    def pids(self) -> list[int]:
        """The process id of each live worker, by slot, as the actors reported it when they started.

        Answered while the workers are busy: each actor's report was asked for before any task.
        """
        ray = _ray()
        return [ray.get(self._info_refs[s])["pid"] for s, a in enumerate(self._slots) if a is not None]

    def check_model(self, model, whash: str | None = None) -> None:
        """Refuse a driver `model` other than the workers' (name, depth or dtype); warn on other weights.

        The weights may differ in the last bits for the same model loaded on another device
        (a GPU), so a weights-hash difference is a warning, not an error.

        Args:
            model: the driver's model.
            whash: its `weights_hash`, if already known (else computed).

        Raises:
            ValueError: the workers hold a model with another name, number of layers or dtype.
        """
        from tracer.model import weights_hash  # noqa: PLC0415

        mine = model_identity(model)
        theirs = {k: self.info[0].get(k) for k in mine}
        if mine != theirs:
            raise ValueError(f"workers hold model {theirs}, but the driver's model is {mine}; give the pool the same model")
        whash = whash or weights_hash(model)
        if any(i["weights_hash"] != whash for i in self.info):
            log.warning("the workers' model weights differ from the driver's (hash %s vs %s); "
                        "results may differ from a single-process run", self.info[0]["weights_hash"][:12], whash[:12])

    # ---------------------------------------------------------------- tasks

    def map(self, fn: Callable[[Any, Any], Any], tasks: Iterable[Any]) -> Iterator[tuple[int, Any]]:
        """Run `fn(model, task)` for each task on the workers; yield `(index, result)` as each finishes.

        Tasks are taken from `tasks` lazily, one per free worker, so a generator may decide
        what to send next from what came back. Each index is yielded once. A task whose worker
        dies is sent again (to a live worker, or to a fresh one in the dead one's place).

        Args:
            fn: called in a worker as `fn(model, task)`; a module-level function or a
                `functools.partial` of one (it is pickled).
            tasks: the task arguments (pickled; keep them small).

        Yields:
            `(index into tasks, fn's result)`, in completion order.

        Raises:
            The exception `fn` raised, in the driver (the tasks still running are dropped).
            RuntimeError: a task whose workers died more than `task_retries` times, or no
                worker left alive.
        """
        ray = _ray()
        died = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError,
                getattr(ray.exceptions, "OutOfMemoryError", ray.exceptions.RayActorError))
        fn_ref = ray.put(fn)  # pickled once, not once per task (an evaluator may hold large tables)
        source = iter(enumerate(tasks))
        queue: collections.deque = collections.deque()  # (index, task, tries): sent again after a death
        running: dict = {}  # ObjectRef -> (slot, index, task, tries)
        idle = [s for s, a in enumerate(self._slots) if a is not None]
        exhausted = False

        def fill():
            nonlocal exhausted
            while idle:
                if queue:
                    i, task, tries = queue.popleft()
                elif not exhausted:
                    try:
                        i, task = next(source)
                    except StopIteration:
                        exhausted = True
                        continue
                    tries = 0
                else:
                    return
                s = idle.pop(0)
                running[self._slots[s].run.remote(fn_ref, task)] = (s, i, task, tries)

        try:
            fill()
            while running:
                ready, _ = ray.wait(list(running), num_returns=1)
                ref = ready[0]
                s, i, task, tries = running.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as err:  # fn raised: the driver raises it too
                    raise err.as_instanceof_cause() from None
                except died as err:
                    self._replace(s, err)
                    if tries >= self.task_retries:
                        raise RuntimeError(f"task {i}: its worker died {tries + 1} times ({type(err).__name__}); giving up") from err
                    log.warning("task %d: its worker died (%s); sending it again", i, type(err).__name__)
                    self.resent += 1
                    queue.appendleft((i, task, tries + 1))
                    if self._slots[s] is not None:
                        idle.append(s)
                    if not any(a is not None for a in self._slots):
                        raise RuntimeError(f"every worker died; {len(queue) + len(running)} tasks or more not done") from err
                    fill()
                    continue
                idle.append(s)
                fill()  # the next task goes out before this result is handed over
                yield i, result
        finally:
            for ref in running:  # results nobody will read
                try:
                    ray.cancel(ref)
                except Exception:  # noqa: BLE001 - best effort; the actor finishes and the result is dropped
                    pass

    def _replace(self, s: int, err: BaseException) -> None:
        """Slot `s`'s actor died: start a fresh one there while the slot has restarts left."""
        ray = _ray()
        self.deaths += 1
        try:
            ray.kill(self._slots[s], no_restart=True)
        except Exception:  # noqa: BLE001 - it is gone already
            pass
        if self._restarts_left[s] <= 0:
            log.warning("worker %d died (%s) with no restarts left; %d workers remain", s, type(err).__name__,
                        sum(a is not None for a in self._slots) - 1)
            self._slots[s] = None
            return
        self._restarts_left[s] -= 1
        log.warning("worker %d died (%s); starting a fresh one in its place", s, type(err).__name__)
        self._start(s)

    def run_all(self, fn: Callable[[Any, Any], Any], task: Any = None) -> list:
        """`fn(model, task)` once on every live worker; the results by slot (for set-up and checks)."""
        ray = _ray()
        return ray.get([a.run.remote(fn, task) for a in self._slots if a is not None])

    # ---------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Stop the actors, and the Ray instance if this pool started it."""
        ray = _ray()
        for a in self._slots:
            if a is not None:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # noqa: BLE001
                    pass
        self._slots = [None] * len(self._slots)
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"WorkerPool(model={self.spec!r}, workers={self.n_workers}, threads={self.threads}, gpus_per_worker={self.gpus_per_worker})"


def add_ray_args(parser) -> None:
    """The `--ray`, `--workers` and `--worker-threads` options (`python -m tracer`, the benchmarks)."""
    g = parser.add_argument_group("Ray workers (pip install romelens[ray]; docs/scaling.md)")
    g.add_argument("--ray", default=None, metavar="local|auto|ADDRESS",
                   help="run on Ray workers: 'local' starts a local cluster, 'auto' or HOST:PORT joins a running one")
    g.add_argument("--workers", type=int, default=None,
                   help="with --ray: worker processes, each holding the model (default: one per GPU, else per CPU)")
    g.add_argument("--worker-threads", type=int, default=1, help="with --ray: torch CPU threads (and CPUs) per worker")


def pool_from_args(args) -> WorkerPool | None:
    """A `WorkerPool` from `--ray`, `--workers`, `--worker-threads`, `--model`, `--model-loader`; None without `--ray`.

    Raises:
        ValueError: `--workers` without `--ray`, or values `WorkerPool` refuses.
    """
    address = getattr(args, "ray", None)
    if address is None:
        if getattr(args, "workers", None) is not None:
            raise ValueError(f"--workers {args.workers} needs --ray local|auto|ADDRESS")
        return None
    threads = args.worker_threads
    start = time.perf_counter()
    pool = WorkerPool(model=args.model, loader=getattr(args, "model_loader", None), workers=args.workers,
                      cpus_per_worker=threads, threads=threads, address=address)
    log.info("%r started in %.1f s", pool, time.perf_counter() - start)
    return pool
