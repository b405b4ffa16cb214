"""Loaders that Ray workers import by name (`"tests.tracer.ray_models:tiny"`): the unit-test model.

`tiny(spec)` builds the same tiny random model as the `tiny_model` fixture of
tests/conftest.py (same tokenizer, same seed), deterministically, in any process, so a
worker's model is the driver's bit for bit.
"""

from __future__ import annotations

import pytest

LOADER = "tests.tracer.ray_models:tiny"


def local_pool():
    """The body of a module-scoped `pool` fixture: a local Ray cluster of 2 one-thread
    workers holding the tiny model, closed (and the cluster shut down) afterwards; skips
    where Ray is not installed."""
    from tracer.workers import WorkerPool, ray_available

    if not ray_available():
        pytest.skip('Ray is not installed (pip install "romelens[ray]")')
    import ray

    if ray.is_initialized():  # pragma: no cover - another module's cluster
        ray.shutdown()
    p = WorkerPool(model="tiny", loader=LOADER, workers=2, cpus_per_worker=1, threads=1, address="local")
    yield p
    p.close()


def tiny(spec: str = "tiny"):
    """The `tiny_model` fixture's model for the installed TransformerLens (`spec` is ignored)."""
    from tests.conftest import _train_tokenizer, make_tiny_bridge, make_tiny_hooked
    from tracer.model import TL_API

    tokenizer = _train_tokenizer()
    if TL_API == 3:
        return make_tiny_hooked(tokenizer)
    model, _ = make_tiny_bridge(tokenizer)
    return model


def refuse(model, task):
    """A task that raises, as a bug in a task function would (for the pool's error path)."""
    raise ValueError(f"task {task!r} refused")


def pid(model, task):
    """The worker's process id (which worker ran the task)."""
    import os

    return os.getpid()


class KeepOpen:
    """A pool whose `close` does nothing: a test's shared pool, handed to code that closes what it is given."""

    def __init__(self, pool):
        self._pool = pool

    def close(self):
        return None

    def __getattr__(self, name):
        return getattr(self._pool, name)
