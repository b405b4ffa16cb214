"""The shared resumable runner: edit, evaluate, restore, one JSON line per record, then a summary.

A run directory holds:

- `records.jsonl`: one line per finished record, appended and flushed as it finishes;
- `perplexity_before.json`: the unedited model's WikiText perplexity (computed once);
- `summary.json`, `summary.md`: the aggregated table (rewritten at the end of every run);
- `figure.html`: a plotly bar chart comparing this run with its sibling runs.

Running again with the same directory resumes: records already in `records.jsonl` are
skipped (never redone, never lost), and a truncated last line left by a kill is dropped
and redone (`tracer.resume` states the rule, which every resumable run here follows).

Without `batch`, each record is edited alone, evaluated and restored, so records never
affect each other. With `batch=K` (MEMIT-style), the records are cut into fixed chunks of K
(by position in the full record list, so a resumed chunk is the same chunk), the K edits
are applied at once, and each still-unfinished record of the chunk is evaluated on that
edited model.

Example:
    >>> from benchmarks.runner import get_method, run_records
    >>> rows = run_records(model=model, method=get_method("none"), records=records,
    ...                    out_dir="results/none", evaluate=my_eval)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from tracer.files import atomic_write_text
from tracer.resume import append_jsonl, read_jsonl
from tracer.result import save_figure

log = logging.getLogger(__name__)

RECORDS = "records.jsonl"
PREFETCH_RECORDS = 10  # records whose shared work (`evaluate.prefetch`) is done together
PPL_BEFORE = "perplexity_before.json"
UNEDITED_DIR = "before"  # `execute(unedited=...)`: the records scored on the unedited model


# --------------------------------------------------------------------------- methods


class _NoEditResult(contextlib.AbstractContextManager):
    """The result of the `none` method: nothing to restore."""

    def restore(self) -> None:
        """Nothing to undo."""
        return None

    def __exit__(self, *exc) -> None:
        self.restore()


class NoEdit:
    """The unedited baseline: `edit_many` changes nothing.

    Example:
        >>> with NoEdit().edit_many(model, requests):
        ...     pass
    """

    name = "none"

    def edit_many(self, model, requests, hparams=None, **kw) -> _NoEditResult:
        """Change nothing; the result restores nothing."""
        return _NoEditResult()


def get_method(name: str):
    """The editing method called `name`: `"none"`, or an entry of `editor.METHODS` (imported lazily).

    Raises:
        ValueError when the name is unknown or the editor package does not provide methods yet.
    """
    if name == "none":
        return NoEdit()
    try:
        import editor  # noqa: PLC0415

        methods = editor.METHODS
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"method {name!r} needs editor.METHODS, which is not available ({type(err).__name__}: {err}); "
            "only 'none' works without the editor"
        ) from err
    if name not in methods:
        raise ValueError(f"method {name!r} is not one of {sorted(['none', *methods])}")
    return methods[name]


# --------------------------------------------------------------------------- files


def read_rows(path: str | os.PathLike, *, repair: bool = False) -> list[dict]:
    """The rows of a `records.jsonl`, one per `case_id`, read by `tracer.resume.read_jsonl`.

    A last line cut off mid-write is dropped (and cut from the file if `repair`); a later
    line for a `case_id` replaces the earlier one.

    Raises:
        ValueError for a malformed line that is not the last one (the file is corrupt, not
        truncated), or a row without `case_id`.
    """
    return list(read_jsonl(path, key="case_id", repair=repair).values())


# --------------------------------------------------------------------------- running


def requests_of(records: Sequence[Any]) -> list:
    """The edit requests of `records`, in order, as one flat list.

    A record's `.request()` is one `EditRequest` (CounterFact, zsRE) or a tuple of them (an
    MQuAKE case's 1-4 rewrites, which are edited together).
    """
    out: list = []
    for r in records:
        req = r.request()
        out.extend(req if isinstance(req, (tuple, list)) else [req])
    return out


def _chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def _apply(method, model, requests, hparams, edit_kwargs, save_to: Path | None = None):
    """Edit the model for `requests`; returns the applied edit (a context manager that restores).

    With `save_to` (a batch), a method with `compute` (every `editor.METHODS` entry) computes
    an `Edit`, saves it there before anything is written into the model (so a failed save
    leaves the model unedited), then applies it. Otherwise `edit_many` (compute and apply in
    one call, for `editor` methods; also the `none` method and test fakes).
    """
    kw = dict(edit_kwargs or {})
    if hparams is not None:
        kw["hparams"] = hparams
    compute = getattr(method, "compute", None)
    if save_to is None or compute is None:
        return method.edit_many(model, requests, **kw)
    edit = compute(model, requests, **kw)
    edit.save(save_to)  # a batch edit can take many minutes: keep it for resuming
    return edit.apply(model)


def _reapply(model, path: Path, requests: Sequence[Any]):
    """`Edit.load(path).apply(model)`: the saved batch edit, on the model it was computed for;
    None (nothing applied) when it was saved for other requests than `requests`.

    Batch files are named by the group's position, so a rerun into the same directory over
    another selection (`--case-ids`, or a longer `--n` whose last group grows) finds, at that
    position, an edit computed for other records."""
    from editor import Edit  # noqa: PLC0415

    edit = Edit.load(path)
    if list(edit.requests) != list(requests):
        log.warning("the saved batch edit %s is for other records (%d requests, this group has %d); "
                    "computing this group's edit again", path, len(edit.requests), len(requests))
        return None
    log.info("resuming with the saved batch edit %s", path)
    return edit.apply(model)


def edit_summary(edit) -> dict:
    """What a record's line keeps about its edit: the final target NLL of the value
    optimisation (each request's, ROME/MEMIT) and its step count, FT-L's last loss, ROME's
    `‖δ‖/‖v‖` per request (the clamp binds where it equals `clamp_norm_factor`), and
    `‖ΔW_l‖/‖W_out,l‖`."""
    diag = getattr(edit, "diagnostics", None) or {}
    out: dict = {}
    curves = [s["nll_curve"] for s in diag.get("steps", [])] or diag.get("nll_curves") or []
    if curves:
        out["edit_final_nll"] = [c[-1] for c in curves if c]
        out["edit_steps"] = [len(c) for c in curves]
    elif diag.get("nll_curve"):
        out["edit_final_nll"] = [diag["nll_curve"][-1]]
        out["edit_steps"] = [len(diag["nll_curve"])]
    steps = diag.get("steps", [])
    if steps and all("delta_norm" in s and s.get("value_norm") for s in steps):
        # ROME: ‖δ‖ / ‖v‖ per request; equal to clamp_norm_factor where the clamp binds
        out["delta_over_value"] = [s["delta_norm"] / s["value_norm"] for s in steps]
    if "delta_ratio" in diag:
        out["delta_ratio"] = {str(k): v for k, v in diag["delta_ratio"].items()}
    return out


def perplexity_before(out_dir: str | os.PathLike, model, perplexity: Callable[[Any], float]) -> float:
    """The unedited model's perplexity, computed once per run directory and stored."""
    path = Path(out_dir) / PPL_BEFORE
    if path.exists():
        return float(json.loads(path.read_text())["perplexity"])
    value = float(perplexity(model))
    atomic_write_text(path, json.dumps({"perplexity": value}) + "\n")
    return value


def run_group(
    model,
    method,
    group: Sequence[Any],
    pending: Sequence[Any],
    *,
    emit: Callable[[dict], None],
    evaluate: Callable[[Any, Any], dict],
    position: int = 0,
    batch: int | None = None,
    hparams=None,
    perplexity: Callable[[Any], float] | None = None,
    ppl_every: int = 25,
    edit_kwargs: dict | None = None,
    saved: Path | None = None,
    first: bool = True,
) -> None:
    """Edit the model for one group of records, evaluate its pending records, restore: a row each.

    The one body of `run_records`, run in this process or by a worker on a chunk
    (`run_chunk`). The model is the same before and after (the edit is restored, even when
    an evaluation raises).

    Args:
        model: the model.
        method, evaluate, batch, hparams, perplexity, ppl_every, edit_kwargs: as in `run_records`.
        group: the records edited together (one record, a `batch`, or all of them for `none`).
        pending: the records of `group` to evaluate (those not in `records.jsonl` yet).
        emit: called with each record's row, as soon as it is made.
        position: the group's first record's index in the run (`ppl_every` counts it).
        saved: where a batch edit is saved before it is applied, and re-applied from when the
            file exists (resuming); None neither saves nor reads.
        first: whether `pending` starts its group: its first row then carries the edit's time,
            summary and perplexity (False for later slices of the `none` method's one group).

    Raises:
        What `evaluate` or `perplexity` raise; a failed edit is recorded as each pending
        record's `"error"` row instead.
    """
    t0 = time.perf_counter()
    try:
        # resuming a batch: reuse its saved edit, if it was saved for this group's records
        edit = _reapply(model, saved, requests_of(group)) if saved is not None and saved.exists() else None
        if edit is None:
            edit = _apply(method, model, requests_of(group), hparams, edit_kwargs, save_to=saved)
        edit_seconds = time.perf_counter() - t0
    except Exception as err:  # a failed edit is recorded, not fatal
        log.warning("edit failed for case_ids %s: %s: %s", [r.case_id for r in group], type(err).__name__, err)
        for r in pending:
            emit({"case_id": r.case_id, "error": f"{type(err).__name__}: {err}"})
        return
    prefetch = getattr(evaluate, "prefetch", None)
    with edit:
        ppl_after = None
        if first and perplexity is not None and (batch or position % ppl_every == 0):
            ppl_after = float(perplexity(model))
        for j, r in enumerate(pending):
            if prefetch is not None and j % PREFETCH_RECORDS == 0:
                prefetch(model, pending[j : j + PREFETCH_RECORDS])  # same model state for these records
            row = {"case_id": r.case_id, **evaluate(model, r)}
            # wall time since the previous record: its share of edit, perplexity and evaluation
            row["seconds"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            if j == 0 and first:
                row["edit_seconds"] = edit_seconds  # the whole group's edit (K edits with --batch K)
                row |= edit_summary(edit)
                if ppl_after is not None:
                    row["ppl_after"] = ppl_after
            emit(row)


def run_chunk(model, chunk: dict) -> dict:
    """A worker's task: `run_group` over a chunk of groups, then whether its model is as it was.

    Args:
        model: the worker's model.
        chunk: `{"method": the method, "groups": [(position, group, pending, first), ...],
            "opts": the other keyword arguments of run_group}`.

    Returns:
        `{"rows": [...], "model_restored": bool}`: every block's `W_out` is compared, bit for
        bit, with what it was before the chunk.
    """
    from tracer import weights_hash  # noqa: PLC0415

    layers = range(model.cfg.n_layers)  # every edit method changes W_out only
    before = weights_hash(model, layers=layers)
    rows: list[dict] = []
    for position, group, pending, first in chunk["groups"]:
        run_group(model, chunk["method"], group, pending, emit=rows.append, position=position, first=first, **chunk["opts"])
    return {"rows": rows, "model_restored": weights_hash(model, layers=layers) == before}


def run_records(
    *,
    model,
    method,
    records: Sequence[Any],
    out_dir: str | os.PathLike,
    evaluate: Callable[[Any, Any], dict],
    batch: int | None = None,
    hparams=None,
    perplexity: Callable[[Any], float] | None = None,
    ppl_every: int = 25,
    max_minutes: float | None = None,
    edit_kwargs: dict | None = None,
    desc: str = "records",
    workers=None,
) -> list[dict]:
    """Edit, evaluate and restore each record (or each batch), appending one JSON line per record.

    Args:
        model: the model; unchanged when this returns (each edit is restored).
        method: an object with `edit_many(model, requests, hparams=None)` returning an
            edit result that `.restore()`s and is a context manager. With `batch`, a method
            that also has `compute` (an `editor.METHODS` entry) has its `Edit` saved under
            `edits/` before it is applied, and a resumed batch applies the saved `Edit`.
        records: records with `.case_id` and `.request()` (one request or a tuple, `requests_of`).
        out_dir: run directory; `records.jsonl` there is resumed.
        evaluate: `evaluate(model, record) -> dict` of metrics on the (edited) model. If it
            has a `prefetch(model, records)` method, that is called before each run of up
            to `PREFETCH_RECORDS` records evaluated on the same model state.
        batch: None edits records one at a time; K applies K edits at once.
        hparams: passed to `edit_many` when not None.
        perplexity: `perplexity(model) -> float`; when given, measured after the edit on
            every `ppl_every`-th record (per-record runs) or once per batch (batched runs)
            and stored as `ppl_after` on that record's line.
        ppl_every: sampling period for per-record runs.
        max_minutes: stop starting new records (or batches) after this many minutes; the
            rows so far are returned and a later run resumes from there.
        edit_kwargs: extra keyword arguments for `edit_many` (e.g. `cache_dir`).
        desc: tqdm label.
        workers: a `tracer.workers.WorkerPool` holding the same model, or None to run here.
            Each group (a record, a batch, or `PREFETCH_RECORDS` records of the `none`
            method) goes to a worker as one task (`run_chunk`): the worker edits, evaluates
            (generation and perplexity included), restores and reports whether its model is
            as before; this process alone appends the rows, in completion order. The first
            group runs alone, so that caches it fills (key statistics under `cache_dir`) are
            there for the others. A batch edit is not saved under `edits/` (a worker may be
            on another machine): a resumed batch is computed again. Rows of a group whose
            worker's model was not restored carry `"model_restored": False`.
            `evaluate`, `method` and `perplexity` are pickled to the workers.

    Returns:
        The rows for `records` in record order (resumed and new).

    Raises:
        ValueError: `batch` or `ppl_every` below 1, or a corrupt `records.jsonl` (`tracer.resume`).
        RuntimeError: from `WorkerPool.map`, a group whose workers kept dying.
    """
    if batch is not None and batch < 1:
        raise ValueError(f"batch {batch} must be >= 1 (or None for one edit at a time)")
    if ppl_every < 1:
        raise ValueError(f"ppl_every {ppl_every} must be >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RECORDS
    done = read_jsonl(path, key="case_id", repair=True)
    wanted = {r.case_id for r in records}
    todo = [r for r in records if r.case_id not in done]
    log.info("%s: %d records done already, %d to run", out_dir, len(wanted & done.keys()), len(todo))
    if batch:
        groups = _chunks(list(records), batch)
    elif isinstance(method, NoEdit):  # nothing is edited: records cannot affect each other
        groups = [list(records)]
    else:
        groups = [[r] for r in records]
    bar = tqdm(total=len(todo), desc=desc, unit="rec", dynamic_ncols=True)
    start = time.perf_counter()
    path.touch()  # the run directory shows its records file from the start

    def write(row: dict) -> None:
        append_jsonl(path, row)
        done[row["case_id"]] = row
        bar.update(1)
        minutes = (time.perf_counter() - start) / 60
        bar.set_postfix(rec_per_min=f"{bar.n / minutes:.2f}" if minutes > 0 else "-")

    def out_of_time() -> bool:
        if max_minutes is not None and time.perf_counter() - start > 60 * max_minutes:
            log.warning("stopping after %.1f minutes (--max-minutes); rerun to resume", max_minutes)
            return True
        return False

    opts = dict(evaluate=evaluate, batch=batch, hparams=hparams, perplexity=perplexity, ppl_every=ppl_every,
                edit_kwargs=edit_kwargs)
    if workers is None:
        for gi, group in enumerate(groups):
            pending = [r for r in group if r.case_id not in done]
            if not pending:
                continue
            if out_of_time():
                break
            saved = out_dir / "edits" / f"batch{gi:04d}.safetensors" if batch else None
            run_group(model, method, group, pending, emit=write, position=gi * (batch or 1), saved=saved, **opts)
    else:
        workers.check_model(model)
        tasks = []  # one task per group; the `none` method's one group in slices of PREFETCH_RECORDS
        for gi, group in enumerate(groups):
            pending = [r for r in group if r.case_id not in done]
            step = PREFETCH_RECORDS if len(groups) == 1 and not batch and isinstance(method, NoEdit) else len(pending)
            for j in range(0, len(pending), max(step, 1)):
                tasks.append({"method": method, "opts": opts,
                              "groups": [(gi * (batch or 1), group, pending[j : j + step], j == 0)]})

        def feed(items):
            for t in items:
                if out_of_time():
                    return
                yield t

        def collect(reply: dict) -> None:
            if not reply["model_restored"]:
                log.error("a worker's model was not restored after case_ids %s", [r["case_id"] for r in reply["rows"]])
                for row in reply["rows"]:
                    row["model_restored"] = False
            for row in reply["rows"]:
                write(row)

        warm = tasks[:1] if tasks and not isinstance(method, NoEdit) else []
        for part in (warm, tasks[len(warm):]):  # the first group alone: it fills the caches the rest read
            for _, reply in workers.map(run_chunk, feed(part)):  # completion order
                collect(reply)
    bar.close()
    return [done[r.case_id] for r in records if r.case_id in done]


def check_run_args(args, records: Sequence[Any], *, checkpoint_evaluate: Callable | None = None):
    """Refuse a bad combination of run options before anything slow is loaded; returns the method.

    `execute` calls it first; a benchmark calls it itself before its own slow set-up (the
    CounterFact TF-IDF reference reads WikiText), so the error a user sees is about the
    option they got wrong.

    Raises:
        ValueError: an unknown `--method` (`get_method`); `--sequential` with the `none`
            method or a bad `--batch`, `--checkpoint-every` or `--checkpoint-sample`;
            `--checkpoint-every` / `--checkpoint-sample` / `--final-gen-sample` without
            `--sequential`, or a `--final-gen-sample` that is not an integer >= 1 or that
            `checkpoint_evaluate` None leaves nothing to sample for; `--sequential` with
            `--ray`, or `--workers` without `--ray`; a `--corpus` or `--wikitext` that is
            not a file.
    """
    from benchmarks.sequential import CHECKPOINT_SAMPLE, check_sequential_args  # noqa: PLC0415

    method = get_method(args.method)
    sequential = getattr(args, "sequential", False)
    given = [f for f, v, default in (("--checkpoint-every", getattr(args, "checkpoint_every", None), None),
                                     ("--checkpoint-sample", getattr(args, "checkpoint_sample", CHECKPOINT_SAMPLE),
                                      CHECKPOINT_SAMPLE),
                                     ("--final-gen-sample", getattr(args, "final_gen_sample", None), None)) if v != default]
    if given and not sequential:
        raise ValueError(f"{given} only apply with --sequential")
    gen_sample = getattr(args, "final_gen_sample", None)
    if gen_sample is not None:
        if isinstance(gen_sample, bool) or not isinstance(gen_sample, int) or gen_sample < 1:
            raise ValueError(f"--final-gen-sample {gen_sample!r} must be an integer >= 1")
        if checkpoint_evaluate is None:
            raise ValueError("--final-gen-sample: this benchmark's evaluation has no generation to sample")
    seq_batch = 1 if args.batch is None else args.batch  # a sequential run edits one record at a time by default
    if sequential:
        check_sequential_args(method, records, seq_batch, args.checkpoint_every, args.checkpoint_sample)
    if getattr(args, "ray", None) is not None and sequential:
        raise ValueError(f"--ray {args.ray} cannot run --sequential: lifelong edits accumulate on one model, batch "
                         "after batch, so they cannot be split across workers; drop --ray (or --sequential)")
    if getattr(args, "ray", None) is None and getattr(args, "workers", None) is not None:
        raise ValueError(f"--workers {args.workers} needs --ray local|auto|ADDRESS")
    for flag in ("corpus", "wikitext"):  # a bad path now, not as an error row for every record later
        path = getattr(args, flag, None)
        if path and not str(path).startswith("hf:") and not Path(path).is_file():
            raise ValueError(f"--{flag} {path!r} is not a file")
    return method


def execute(
    args, *, records: Sequence[Any], evaluate: Callable[[Any, Any], dict], desc: str,
    checkpoint_evaluate: Callable[[Any, Any], dict] | None = None,
    unedited: tuple[Callable[[Any, Any], dict], Callable[[list[dict]], Callable[[Any, Any], dict]]] | None = None,
) -> dict:
    """The shared body of `python -m benchmarks.counterfact` and `benchmarks.zsre`.

    Sets the torch threads, loads the model, measures the unedited perplexity (once per run
    directory), resolves the method's hparams once (the preset with `--hparam` overrides)
    and passes them to every edit, runs the records and checks that every block's `W_out`
    is back as it was. With `--sequential`, the edits accumulate batch after batch
    (`benchmarks.sequential.run_sequential`): `checkpoint_evaluate` (default `evaluate`)
    scores the edited records at each checkpoint, `evaluate` every record at the end.

    Returns:
        `{"rows", "hparams", "restored", "ppl_before", "hparams_record"}`, plus
        `"checkpoints"`, `"complete"` and `"meta"` (for the summary) for a sequential run,
        which also writes `collapse.html` (`benchmarks.sequential.collapse_figure`).

    `unedited=(evaluate_before, make_evaluate)` is for a benchmark that scores each record
    before and after editing (MQuAKE): with an edit method, the records are first scored on
    the unedited model by `evaluate_before`, in a resumable run of their own under
    `<out>/before/`, and the edit run is evaluated by `make_evaluate(rows_before)` instead of
    `evaluate`. With the `none` method there is no second pass (`evaluate` scores both).
    `--max-minutes` bounds that pass too; the edit run then covers the records it scored.

    With `--ray` (`tracer.workers.pool_from_args`), the per-record or batch run goes to a
    `WorkerPool` of `--workers` processes that each load the model (`run_records(workers=)`);
    this process loads it too, for the unedited perplexity, the hparams and the checks.
    `restored` is then also False when a worker reported a model it did not restore.

    Raises:
        ValueError: the options `check_run_args` refuses, before the model is loaded.
    """
    import torch  # noqa: PLC0415

    from benchmarks.perplexity import wikitext_perplexity  # noqa: PLC0415
    from tracer import load_model, weights_hash  # noqa: PLC0415
    from tracer.model import load_any  # noqa: PLC0415

    method = check_run_args(args, records, checkpoint_evaluate=checkpoint_evaluate)
    sequential = getattr(args, "sequential", False)
    seq_batch = 1 if args.batch is None else args.batch  # a sequential run edits one record at a time by default
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    loader = getattr(args, "model_loader", None)
    # --model NAME or FOLDER (load_model), or --model-loader (load_any; without a loader the two are the same)
    model = load_any(args.model, loader=loader, device=args.device) if loader else load_model(args.model, device=args.device)
    ppl = (lambda m: wikitext_perplexity(m, args.wikitext, max_tokens=args.ppl_tokens)) if args.ppl_tokens > 0 else None
    ppl_before = perplexity_before(args.out, model, ppl) if ppl else None
    kwargs = edit_kwargs(args)
    cache = kwargs.get("cache_dir")
    hparams = method_hparams(method, model, args.hparam, cache_dir=cache)
    overridden = hparams is not None
    if hparams is None and hasattr(method, "hparams_for"):  # the preset, resolved once; every edit gets it
        hparams = method.hparams_for(model, cache_dir=cache)
    mlp_layers = range(model.cfg.n_layers)  # every edit method changes W_out only
    before = weights_hash(model, layers=mlp_layers)
    from tracer.workers import pool_from_args  # noqa: PLC0415  (imports Ray only with --ray)

    pool = pool_from_args(args)
    try:
        rows, extra = _execute_runs(args, model=model, method=method, records=records, evaluate=evaluate, desc=desc,
                                    checkpoint_evaluate=checkpoint_evaluate, unedited=unedited, sequential=sequential,
                                    seq_batch=seq_batch, hparams=hparams, ppl=ppl, kwargs=kwargs, pool=pool)
    finally:
        if pool is not None:
            pool.close()
    restored = weights_hash(model, layers=mlp_layers) == before
    if not restored:
        log.error("the model's weights differ from before the run: an edit was not restored")
    if any(r.get("model_restored") is False for r in rows):
        log.error("a worker's model was not restored after an edit (rows marked model_restored false)")
        restored = False
    return {"rows": rows, "hparams": hparams, "restored": restored, "ppl_before": ppl_before,
            "hparams_record": hparams_record(method, model, hparams, overridden=overridden), **extra}


def _execute_runs(args, *, model, method, records, evaluate, desc, checkpoint_evaluate, unedited, sequential, seq_batch,
                  hparams, ppl, kwargs, pool) -> tuple[list[dict], dict]:
    """`execute`'s runs (the unedited pass, then the sequential or per-record/batch run): `(rows, extra)`."""
    from benchmarks.sequential import collapse_figure, run_sequential  # noqa: PLC0415

    extra: dict = {}
    if unedited is not None and not isinstance(method, NoEdit):
        evaluate_before, make_evaluate = unedited
        rows_before = run_records(model=model, method=NoEdit(), records=records, out_dir=Path(args.out) / UNEDITED_DIR,
                                  evaluate=evaluate_before, desc=f"{desc} (unedited)", workers=pool,
                                  max_minutes=args.max_minutes)
        scored = {r["case_id"] for r in rows_before}
        if len(scored) < len(records):  # stopped by --max-minutes: edit only what has its unedited row
            log.warning("unedited pass: %d of %d records so far; rerun to resume", len(scored), len(records))
            records = [r for r in records if r.case_id in scored]
        evaluate = make_evaluate(rows_before)
    if sequential:
        final, final_note = evaluate, "every edited record, after the last batch"
        n_gen = getattr(args, "final_gen_sample", None)
        if n_gen is not None and n_gen < len(records):  # generation (GE, RS) on a seeded sample; ES/PS/NS on all
            gen_ids = {r.case_id for r in random.Random(0).sample(list(records), n_gen)}
            final = lambda m, rec: (evaluate if rec.case_id in gen_ids else checkpoint_evaluate)(m, rec)  # noqa: E731
            final_note += f"; generation (GE, RS) on a seeded sample of {n_gen} (random.Random(0))"
        else:
            gen_ids = None
        seq = run_sequential(
            model=model, method=method, records=records, out_dir=args.out, evaluate=checkpoint_evaluate or evaluate,
            final_evaluate=final, batch=seq_batch, checkpoint_every=args.checkpoint_every, hparams=hparams,
            perplexity=ppl, sample=args.checkpoint_sample, edit_kwargs=kwargs, max_minutes=args.max_minutes,
            desc=desc, final_gen_sample=n_gen,
        )
        rows = seq["records"]
        if seq["checkpoints"]:
            save_figure(collapse_figure([args.out]), Path(args.out) / "collapse.html")
        else:
            log.info("no checkpoint yet (stopped early): no collapse.html; rerun to resume")
        extra = {"checkpoints": seq["checkpoints"], "complete": seq["complete"], "meta": {
            "sequential": {"batch": seq_batch, "checkpoint_every": args.checkpoint_every,
                           "checkpoint_sample": args.checkpoint_sample, "checkpoints": len(seq["checkpoints"]),
                           "complete": seq["complete"], "final_evaluation": final_note,
                           "final_gen_case_ids": sorted(gen_ids) if gen_ids is not None else None}}}
        last = seq["checkpoints"][-1] if seq["checkpoints"] else None
        if last and last.get("seconds"):  # the final evaluation's rows carry no per-record time: edits per
            # minute of the sequence's own time (editing, checkpoint scoring and, on resume, replay)
            extra["meta"]["records_per_min"] = 60.0 * last["n_edits"] / last["seconds"]
    else:
        rows = run_records(
            model=model,
            method=method,
            records=records,
            out_dir=args.out,
            evaluate=evaluate,
            batch=args.batch,
            hparams=hparams,
            perplexity=ppl,
            ppl_every=args.ppl_every,
            max_minutes=args.max_minutes,
            edit_kwargs=kwargs,
            desc=desc,
            workers=pool,
        )
    return rows, extra


def hparams_record(method, model, hparams, *, overridden: bool = True) -> str | None:
    """What a summary says about the hparams: the resolved dataclass, marked as the preset
    or as overridden, so that a run stays readable after a preset changes.

    `hparams` None means the preset, resolved here (`method.hparams_for`); otherwise it is
    recorded as given, as the preset when `overridden` is False.
    """
    if hparams is not None:
        return f"{'overridden' if overridden else 'preset'}: {hparams!r}"
    if not hasattr(method, "hparams_for"):
        return None
    return f"preset: {method.hparams_for(model)!r}"


# --------------------------------------------------------------------------- summaries


def throughput(rows: Sequence[dict]) -> float:
    """Records per minute over the rows' own wall times (edit, perplexity samples and evaluation)."""
    secs = sum(r.get("seconds", 0.0) for r in rows if "error" not in r)
    n = sum(1 for r in rows if "error" not in r)
    return 60.0 * n / secs if secs > 0 else float("nan")


def _fmt(v: Any) -> str:
    if isinstance(v, dict) and "mean" in v:
        m, ci = v["mean"], v.get("ci95")
        if ci is None or (isinstance(ci, float) and math.isnan(ci)):
            return f"{m:.1f}"
        return f"{m:.1f} ± {ci:.1f}"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def markdown_table(summaries: Sequence[dict], columns: Sequence[str]) -> str:
    """One markdown table, a row per summary (run), `columns` then perplexity and throughput."""
    extra = ["ppl before", "ppl after", "records", "failed", "rec/min"]
    head = ["run", "method", *columns, *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        cells = [s.get("run", ""), s.get("method", "")]
        cells += [_fmt(s["columns"].get(c, "")) for c in columns]
        ppl = s.get("perplexity", {})
        cells += [
            _fmt(ppl.get("before", "")),
            _fmt(ppl.get("after", "")),
            str(s.get("records_evaluated", "")),
            str(s.get("records_failed", "")),
            _fmt(s.get("records_per_min", "")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def load_summaries(run_dirs: Sequence[str | os.PathLike]) -> list[dict]:
    """The `summary.json` of each run folder, in order.

    Raises:
        ValueError: a folder without `summary.json`.
    """
    out = []
    for d in run_dirs:
        p = Path(d) / "summary.json"
        if not p.exists():
            raise ValueError(f"run {str(d)!r} has no summary.json; run the benchmark there first")
        out.append(json.loads(p.read_text()))
    return out


def comparison_figure(summaries: Sequence[dict], columns: Sequence[str]):
    """A plotly grouped bar chart: one bar group per metric, one bar per run, with 95% CIs."""
    import plotly.graph_objects as go  # noqa: PLC0415

    fig = go.Figure()
    for s in summaries:
        cols = [c for c in columns if isinstance(s["columns"].get(c), dict)]
        ys = [s["columns"][c]["mean"] for c in cols]
        errs = [s["columns"][c].get("ci95") or 0.0 for c in cols]
        errs = [0.0 if (e is None or math.isnan(e)) else e for e in errs]
        fig.add_bar(name=f"{s.get('method')} ({s.get('run')})", x=cols, y=ys, error_y={"type": "data", "array": errs})
    title = f"{summaries[0].get('benchmark', '')} on {summaries[0].get('model', '')}" if summaries else ""
    fig.update_layout(barmode="group", title=title, yaxis_title="score (×100; GE: entropy ×100)")
    return fig


def write_summary(
    *,
    out_dir: str | os.PathLike,
    rows: Sequence[dict],
    columns: dict,
    column_order: Sequence[str],
    meta: dict,
    requested: int,
    ppl_before: float | None = None,
    notes: Sequence[str] = (),
) -> dict:
    """Write `summary.json`, `summary.md` and `figure.html` (this run and its sibling runs) atomically.

    `figure.html` loads plotly.js from `plotly.min.js` in `out_dir` (written once, see
    `tracer.result.save_figure`), so it opens offline. `records_per_min` is the rows' own
    throughput unless `meta` gives it (a sequential run: edits per minute of the sequence,
    checkpoints included).
    """
    out_dir = Path(out_dir)
    ok = [r for r in rows if "error" not in r]
    afters = [r["ppl_after"] for r in ok if "ppl_after" in r]
    summary = {
        **meta,
        "run": out_dir.name,
        "columns": columns,
        "records_requested": requested,
        "records_evaluated": len(ok),
        "records_failed": len(rows) - len(ok),
        "records_missing": requested - len(rows),
        "records_per_min": meta.get("records_per_min", throughput(rows)),
        "perplexity": {
            "before": ppl_before,
            "after": (sum(afters) / len(afters)) if afters else None,
            "after_samples": len(afters),
        },
        "notes": list(notes),
    }
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    md = [f"# {meta.get('benchmark', '')}: {meta.get('method', '')} on {meta.get('model', '')}", ""]
    md.append(f"Command: `{meta.get('command', '')}`")
    md.append("")
    md.append(markdown_table([summary], column_order))
    md += [f"- {n}" for n in notes]
    atomic_write_text(out_dir / "summary.md", "\n".join(md) + "\n")
    siblings = []
    for p in sorted(out_dir.parent.glob("*/summary.json")):
        with contextlib.suppress(ValueError, OSError):
            s = json.loads(p.read_text())
            if s.get("benchmark") == meta.get("benchmark") and s.get("model") == meta.get("model"):
                siblings.append(s)
    try:
        save_figure(comparison_figure(siblings or [summary], column_order), out_dir / "figure.html")
    except ImportError:  # pragma: no cover - plotly is a dependency
        log.warning("plotly not installed; no figure written")
    return summary


# --------------------------------------------------------------------------- command line


def add_common_args(parser) -> None:
    """The options `benchmarks.counterfact` and `benchmarks.zsre` share."""
    from benchmarks.sequential import CHECKPOINT_SAMPLE  # noqa: PLC0415
    from tracer.model import add_model_args  # noqa: PLC0415
    from tracer.workers import add_ray_args  # noqa: PLC0415

    add_model_args(parser)  # --model NAME or local folder, --model-loader MODULE:FUNCTION
    parser.add_argument("--method", default="none", help="none, or a name in editor.METHODS (rome, memit, ft-l)")
    parser.add_argument("--n", type=int, default=100, help="number of records (from --start)")
    parser.add_argument("--start", type=int, default=0, help="index of the first record")
    parser.add_argument("--case-ids", default=None, metavar="IDS",
                        help="keep only these case_ids of the --start/--n slice: comma-separated, or @FILE "
                        "(ids separated by commas or whitespace; a JSON list also), e.g. a sequential run's final_gen_case_ids")
    parser.add_argument("--out", required=True, help="run directory (resumed if it exists)")
    parser.add_argument("--data", default=None, help="records JSON (default: $ROMELENS_DATA or ../shared/data)")
    parser.add_argument("--batch", type=int, default=None, help="apply K edits at once (MEMIT); default one at a time")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ppl-tokens", type=int, default=2048, help="WikiText-2 tokens for perplexity; 0 disables")
    parser.add_argument("--ppl-every", type=int, default=25, help="per-record runs: perplexity after every k-th edit")
    parser.add_argument("--wikitext", default=None, help="WikiText-2 raw test text (default: shared data)")
    parser.add_argument("--corpus", default=None,
                        help="text for the editor's key statistics (default: the --wikitext file if given, "
                        "else WikiText-2 test in $ROMELENS_DATA or ../shared/data)")
    parser.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the method's preset for the model (repeatable), e.g. layer=5; "
                        "a layer (or layers) given here skips choosing one by causal tracing")
    parser.add_argument("--cache-dir", default=None,
                        help="editor cache root for key statistics (default: romelens's cache, ~/.cache/romelens)")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop after this long, summarize, resume later")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 avoids oversubscription on shared CPUs)")
    parser.add_argument("--sequential", action="store_true",
                        help="lifelong editing: edit batch after batch (--batch K, default 1) without restoring in "
                        "between; checkpoints in checkpoints.jsonl, collapse.html (benchmarks.sequential)")
    parser.add_argument("--checkpoint-every", type=int, default=None, metavar="M",
                        help="with --sequential: a checkpoint every M edits (default: every batch)")
    parser.add_argument("--final-gen-sample", type=int, default=None, metavar="N",
                        help="with --sequential: the final evaluation generates (GE, RS) for a seeded sample of N "
                        "edited records only; ES/PS/NS cover all (default: generation for all)")
    parser.add_argument("--checkpoint-sample", type=int, default=CHECKPOINT_SAMPLE, metavar="S",
                        help="with --sequential: most edited records scored per checkpoint (a seeded sample)")
    add_ray_args(parser)  # --ray local|auto|ADDRESS, --workers N, --worker-threads T (per-record and --batch runs)


def select_case_ids(records: Sequence[Any], spec: str | None) -> list[Any]:
    """The records of `records` whose `case_id` is listed in `spec` (`--case-ids`), in file order.

    Args:
        records: loaded records (each with a `case_id`), already sliced by `--start`/`--n`.
        spec: None (keep all), comma-separated ids such as `"3,17,40"` (or a JSON list,
            `"[3, 17, 40]"`), or `"@FILE"` for a file of ids separated by commas or
            whitespace (or holding a JSON list).

    Returns:
        The kept records, in the order of `records`.

    Raises:
        ValueError: an id that is not an integer, an empty list, or ids absent from the
            slice (named, so a run never scores fewer records than asked without saying so).
        FileNotFoundError: `@FILE` does not exist.

    Example:
        >>> [r.case_id for r in select_case_ids(load_counterfact(n=10), "7,2")]
        [2, 7]
    """
    if spec is None:
        return list(records)
    text = (Path(spec[1:]).read_text() if spec.startswith("@") else spec).strip()
    if text.startswith("[") and text.endswith("]"):  # a JSON list, as summary.json writes final_gen_case_ids
        text = text[1:-1]
    tokens = [t for t in text.replace(",", " ").split() if t]
    try:
        wanted = {int(t) for t in tokens}
    except ValueError:
        raise ValueError(f"--case-ids {spec!r}: every id must be an integer") from None
    if not wanted:
        raise ValueError(f"--case-ids {spec!r} lists no case_id")
    have = {r.case_id for r in records}
    missing = sorted(wanted - have)
    if missing:
        raise ValueError(f"--case-ids: {len(missing)} id(s) not in the --start/--n slice of {len(records)} records: "
                         f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
    return [r for r in records if r.case_id in wanted]


def parse_overrides(items: Sequence[str], *, what: str = "--hparam") -> dict[str, Any]:
    """`KEY=VALUE` strings to `{KEY: value}`: values parsed as JSON where they parse (else
    kept as strings), lists turned into tuples all the way down (hparams hold tuples).

    Raises:
        ValueError: for an item without `=` or without a key.

    Example:
        >>> parse_overrides(["layer=5", "context_lengths=[[10, 5]]", "key=original"])
        {'layer': 5, 'context_lengths': ((10, 5),), 'key': 'original'}
    """
    def tuples(v):
        return tuple(tuples(x) for x in v) if isinstance(v, list) else v

    fields = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what} {item!r} is not KEY=VALUE")
        try:
            val = json.loads(value)
        except ValueError:
            val = value
        fields[key.strip()] = tuples(val)
    return fields


def method_hparams(method, model, overrides: Sequence[str], *, cache_dir=None):
    """The method's preset for `model` with `KEY=VALUE` overrides (values parsed as JSON), or None.

    A `layer` (or MEMIT `layers`) override is passed to `hparams_for`, so a model without a
    preset gets its hparams at that layer without choosing one by causal tracing; otherwise
    such a model's layer choice is kept under `cache_dir` (`editor.hparams.default_layer`).

    Raises:
        ValueError: overrides for a method without presets, a malformed `KEY=VALUE`, or a key
            that is not a field of the method's hparams (and what the hparams' checks raise).

    Example:
        >>> method_hparams(editor.METHODS["rome"], model, ["layer=5", "mom2_n_tokens=20000"])
    """
    if not overrides:
        return None
    import dataclasses  # noqa: PLC0415

    if not hasattr(method, "hparams_for"):
        raise ValueError(f"--hparam {list(overrides)} given, but method {getattr(method, 'name', method)!r} has no presets")
    fields = parse_overrides(overrides)
    layer = fields.get("layer")
    if layer is None and isinstance(fields.get("layers"), tuple) and fields["layers"]:
        layer = max(fields["layers"])
    explicit = isinstance(layer, int) and not isinstance(layer, bool)
    base = method.hparams_for(model, layer=layer) if explicit else method.hparams_for(model, cache_dir=cache_dir)
    names = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ValueError(f"--hparam {unknown} not fields of {type(base).__name__}; expected some of {sorted(names)}")
    return dataclasses.replace(base, **fields)


def edit_kwargs(args) -> dict:
    """`cache_dir` for the editor (the option, else romelens's default cache, so key statistics
    are computed once per model and layer, not once per edit) and the statistics `corpus`
    (`--corpus`, else the `--wikitext` file, else the editor's default)."""
    if args.method == "none":
        return {}
    from tracer.offline import cache_dir  # noqa: PLC0415

    kw = {"cache_dir": str(args.cache_dir or cache_dir())}
    corpus = getattr(args, "corpus", None) or getattr(args, "wikitext", None)
    return kw | ({"corpus": str(corpus)} if corpus else {})


def command_line(module: str, argv) -> str:
    """The command that started this run, for the summary (`python -m module args...`)."""
    import shlex  # noqa: PLC0415
    import sys  # noqa: PLC0415

    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(shlex.quote(a) for a in ["python", "-m", module, *args])
