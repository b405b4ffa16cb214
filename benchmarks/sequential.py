"""Lifelong (sequential) editing: batches of edits that pile up, with checkpoints, resumable.

The 2022 protocol edits one record (or one batch), scores it and restores the model. Here the
edits accumulate: records `[0, K)` are edited, then `[K, 2K)` on the model that already
holds the first batch, and so on, never restoring in between (Gupta et al. 2024; Fang et al.
2025). What matters is whether early edits survive later ones, and whether the model is
still a language model (perplexity), so at checkpoints the run records:

- the evaluation's mean metrics (e.g. ES, PS, NS, teacher-forced) over the records edited
  so far, or over a fixed seeded sample of at most `sample` of them;
- perplexity on a fixed text budget (when a `perplexity` function is given);
- `‖ΔW_out‖_F` accumulated per edited layer, and `‖W_out‖_F` of that layer;
- wall seconds of this run's batches and checkpoints so far (after a resume, the replay is
  counted and the stretch between the last checkpoint and the kill is not).

A run folder holds `sequential.json` (the run's method, hparams, batch size, checkpoint
settings and record ids; a rerun with any of them different is refused, so results of
another run are never mixed in), `edits/batch_NNNNN.safetensors` (each batch's
`editor.Edit`, computed on the model that held every earlier batch, rank-one factors kept
factored), `checkpoints.jsonl` (one line per checkpoint, keyed by `n_edits`) and
`records.jsonl` (the final evaluation of every edited record, keyed by `case_id`). Rerun with
the same folder, a killed run re-applies the saved batches in order (each `Edit` checks that
it lands on the weights it was computed for), skips finished checkpoints and records, and
goes on: nothing computed is computed again, and the deltas are bit-identical to an
uninterrupted run's.
At the end, or on any error, every batch is restored last-in first-out and
`model_restored` says whether the weights are bit-identical to the start.

Example:
    >>> from benchmarks.sequential import run_sequential
    >>> from editor import METHODS
    >>> from benchmarks.counterfact import CounterFactEval
    >>> out = run_sequential(model=model, method=METHODS["rome"], records=records[:50], batch=1,
    ...                      out_dir="results/seq-rome", evaluate=CounterFactEval(gen_tokens=0))
    >>> out["checkpoints"][-1]["es"], out["model_restored"]
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from benchmarks.runner import requests_of
from editor.edit import Edit
from tracer.files import atomic_write_text
from tracer.model import w_out, weights_hash
from tracer.resume import append_jsonl, read_jsonl

log = logging.getLogger(__name__)

MANIFEST = "sequential.json"
CHECKPOINT_SAMPLE = 200  # most edited records scored per checkpoint, by default
CHECKPOINTS = "checkpoints.jsonl"
RECORDS = "records.jsonl"
EDITS = "edits"


def batch_path(out_dir: str | os.PathLike, i: int) -> Path:
    """Where batch `i`'s `Edit` is saved: `out_dir/edits/batch_{i:05d}.safetensors`."""
    return Path(out_dir) / EDITS / f"batch_{i:05d}.safetensors"


def mean_metrics(rows: Sequence[dict]) -> dict[str, float]:
    """The mean of every top-level number (bools excluded) the rows share, e.g. `es`, `ps`, `ns`."""
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)] if rows else []
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
        if len(vals) == len(rows):
            out[k] = sum(vals) / len(vals)
        else:
            log.warning("checkpoint metric %r left out: %d of %d rows lack a finite value", k, len(rows) - len(vals), len(rows))
    return out


def check_sequential_args(method, records: Sequence[Any], batch: int, checkpoint_every: int | None, sample: int) -> None:
    """Refuse a sequential run's bad arguments before any weight changes.

    Raises:
        ValueError: a method without `compute` (e.g. `none`: nothing accumulates), `batch` or
            `checkpoint_every` or `sample` not an integer >= 1, no records, or repeated
            `case_id`s.
    """
    if not callable(getattr(method, "compute", None)):
        raise ValueError(f"method {getattr(method, 'name', method)!r} cannot edit sequentially: it has no compute() (the 'none' method edits nothing)")
    for name, v in (("batch", batch), ("sample", sample)) + ((("checkpoint_every", checkpoint_every),) if checkpoint_every is not None else ()):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} {v!r} must be an integer >= 1")
    if not records:
        raise ValueError("records is empty; a sequential run needs at least one record")
    ids = [r.case_id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError(f"records repeat case_ids {sorted({i for i in ids if ids.count(i) > 1})[:5]}")


def run_sequential(
    *, model, method, records: Sequence[Any], out_dir: str | os.PathLike, evaluate: Callable[[Any, Any], dict],
    batch: int = 1, checkpoint_every: int | None = None, hparams=None, perplexity: Callable[[Any], float] | None = None,
    final_evaluate: Callable[[Any, Any], dict] | None = None, sample: int = CHECKPOINT_SAMPLE, seed: int = 0,
    edit_kwargs: dict | None = None, max_minutes: float | None = None, desc: str = "batches",
    final_gen_sample: int | None = None,
) -> dict:
    """Edit `records` batch after batch without restoring, with checkpoints; resumable.

    Args:
        model: the model; restored bit-exactly when this returns or raises.
        method: an `editor.METHODS` entry (`compute(model, requests, hparams, **kw) -> Edit`).
        records: records with `.case_id` and `.request()`, edited in this order.
        out_dir: the run folder (see the module docstring); resumed when it exists.
        evaluate: `evaluate(model, record) -> dict` used at checkpoints (teacher-forced metrics,
            no generation: it runs on up to `sample` records per checkpoint).
        batch: edits per batch, K (1: one edit at a time).
        checkpoint_every: edits between checkpoints, rounded up to whole batches (None: every
            batch). The last batch always ends with a checkpoint.
        hparams: the method's hyperparameters (None: its preset for the model).
        perplexity: `perplexity(model) -> float` at each checkpoint (None: not measured).
        final_evaluate: `final_evaluate(model, record) -> dict` for every edited record after
            the last batch (all metrics, e.g. with generation); None uses `evaluate`.
        sample: most records scored per checkpoint; a larger edited set is sampled with
            `random.Random(seed + n_edits)`, so a resumed run scores the same sample.
        seed: see `sample`.
        edit_kwargs: extra keyword arguments for `method.compute` (e.g. `cache_dir`, `stats`).
        max_minutes: stop starting new batches, or final evaluations, after this many minutes
            (a later run resumes).
        desc: the progress bar's label.
        final_gen_sample: recorded in the folder's manifest only (the caller's `final_evaluate`
            generates for that many records), so a resumed run cannot mix two settings; a
            folder written before this key reads as None (generation for all).

    Returns:
        `{"checkpoints": [...], "records": [...], "model_restored": bool, "complete": bool,
        "batches": int}`; `records` is empty until every batch is done.

    Raises:
        ValueError: see `check_sequential_args`; a folder whose `sequential.json` names another
            method, hparams, batch size, checkpoint setting or records, or that holds another
            kind of run; a saved batch of another method or other requests, or that does not
            land on the weights it was computed for (`Edit.apply`).
    """
    check_sequential_args(method, records, batch, checkpoint_every, sample)
    out_dir = Path(out_dir)
    name = getattr(method, "name", type(method).__name__)
    _check_manifest(out_dir, {"method": name, "hparams": None if hparams is None else repr(hparams), "batch": batch,
                              "checkpoint_every": checkpoint_every, "sample": sample, "seed": seed,
                              "case_ids": [r.case_id for r in records], "final_gen_sample": final_gen_sample})
    deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
    every = max(1, math.ceil((checkpoint_every or batch) / batch))  # in batches
    chunks = [list(records[i : i + batch]) for i in range(0, len(records), batch)]
    start_hash = weights_hash(model)
    done_ckpt = read_jsonl(out_dir / CHECKPOINTS, key="n_edits", repair=True)
    applied, originals = [], {}
    # a method whose solve depends on the earlier batches (AlphaEdit) keeps that state here
    sequence = method.new_sequence() if getattr(method, "new_sequence", None) else None
    extra = {} if sequence is None else {"sequence": sequence}
    started = time.monotonic()
    prior_seconds = max((c.get("seconds", 0.0) for c in done_ckpt.values()), default=0.0)
    complete = False
    try:
        bar = tqdm(total=len(chunks), desc=desc, unit="batch")
        for i, chunk in enumerate(chunks):
            path = batch_path(out_dir, i)
            if path.exists():
                edit = Edit.load(path)
                want = tuple(requests_of(chunk))
                if edit.method != name or tuple(edit.requests) != want:
                    raise ValueError(f"{path} is a {edit.method} edit of {[q.subject for q in edit.requests]}, not {name} "
                                     f"of records {[q.subject for q in want]}: another run's folder?")
            else:
                if deadline is not None and time.monotonic() > deadline:
                    log.info("max_minutes %s reached after %d of %d batches; rerun to resume", max_minutes, i, len(chunks))
                    break
                edit = method.compute(model, requests_of(chunk), hparams, **(edit_kwargs or {}), **extra)
                edit.save(path)
            for layer in edit.layers:  # the unedited W_out, for the accumulated change
                originals.setdefault(layer, w_out(model, layer).detach().clone())
            applied.append(edit.apply(model))
            if sequence is not None:  # its keys join the sequence (on resume: replayed, not recomputed)
                sequence.record(model, edit)
            bar.update(1)
            n_edits = min(len(records), (i + 1) * batch)
            if ((i + 1) % every == 0 or i == len(chunks) - 1) and n_edits not in done_ckpt:
                row = _checkpoint(model, records[:n_edits], evaluate, perplexity, originals, sample, seed)
                row["seconds"] = prior_seconds + time.monotonic() - started
                append_jsonl(out_dir / CHECKPOINTS, row)
                done_ckpt[n_edits] = row
                log.info("checkpoint after %d edits: %s", n_edits, {k: round(v, 4) for k, v in row["metrics"].items()})
        else:
            complete = True
        bar.close()
        last_ppl = done_ckpt[len(records)].get("perplexity") if complete else None  # the last batch's checkpoint
        rows = _final_rows(model, records, out_dir, final_evaluate or evaluate, last_ppl, deadline) if complete else []
        complete = complete and len(rows) == len(records)
    finally:
        for a in reversed(applied):
            a.restore()
        restored = weights_hash(model) == start_hash
        if not restored:
            log.error("the model's weights differ from the start after restoring %d batches", len(applied))
    return {
        "checkpoints": sorted(done_ckpt.values(), key=lambda c: c["n_edits"]),
        "records": rows,
        "model_restored": restored,
        "complete": complete,
        "batches": len(chunks),
    }


def _check_manifest(out_dir: Path, manifest: dict) -> None:
    """Write the run's `sequential.json`, or refuse a folder made by a different run.

    Raises:
        ValueError: the folder's manifest differs, or it holds files of another kind of run.
    """
    path = out_dir / MANIFEST
    if path.exists():
        saved = json.loads(path.read_text())
        diff = sorted(k for k in manifest if saved.get(k) != manifest[k])
        if diff:
            raise ValueError(f"{out_dir} holds a sequential run with other {diff} (e.g. {diff[0]}: {saved.get(diff[0])!r} "
                             f"there, {manifest[diff[0]]!r} now); use another --out folder")
        return
    if any((out_dir / f).exists() for f in (RECORDS, CHECKPOINTS, EDITS)):
        raise ValueError(f"{out_dir} holds another run's files but no {MANIFEST}; use another --out folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")
    (out_dir / EDITS).mkdir(exist_ok=True)


@torch.no_grad()
def _checkpoint(model, edited: Sequence[Any], evaluate, perplexity, originals: dict, sample: int, seed: int) -> dict:
    """One checkpoint line: metrics on (a sample of) the edited records, perplexity, norms."""
    n = len(edited)
    scored = list(edited) if n <= sample else random.Random(seed + n).sample(list(edited), sample)
    metrics = mean_metrics([evaluate(model, r) for r in scored])
    norms = {
        str(layer): {"delta_fro": float((w_out(model, layer) - w0).norm()), "w_out_fro": float(w0.norm())}
        for layer, w0 in sorted(originals.items())
    }
    row = {"n_edits": n, "n_scored": len(scored), "metrics": metrics, "norms": norms}
    if perplexity is not None:
        row["perplexity"] = float(perplexity(model))
    return row


def _final_rows(model, records: Sequence[Any], out_dir: Path, evaluate, ppl_after: float | None, deadline) -> list[dict]:
    """Every edited record evaluated on the final model, resumed by `case_id`; `ppl_after` is
    that model's perplexity (from the last checkpoint), kept on each row for the summary.
    Past `deadline` (`time.monotonic()`), the rows so far (a later run finishes them)."""
    done = read_jsonl(out_dir / RECORDS, key="case_id", repair=True)
    for r in tqdm(records, desc="final evaluation", unit="rec"):
        if r.case_id not in done:
            if deadline is not None and time.monotonic() > deadline:
                log.info("max_minutes reached during the final evaluation; rerun to resume")
                return [done[q.case_id] for q in records if q.case_id in done]
            row = {"case_id": r.case_id, **evaluate(model, r)} | ({} if ppl_after is None else {"ppl_after": ppl_after})
            append_jsonl(out_dir / RECORDS, row)
            done[r.case_id] = row
    return [done[r.case_id] for r in records]


def read_checkpoints(run_dir: str | os.PathLike) -> list[dict]:
    """A sequential run's checkpoint lines, by number of edits.

    Raises:
        ValueError: a corrupt `checkpoints.jsonl` (see `tracer.resume`).
    """
    return sorted(read_jsonl(Path(run_dir) / CHECKPOINTS, key="n_edits").values(), key=lambda c: c["n_edits"])


def collapse_figure(run_dirs: Sequence[str | os.PathLike]):
    """One panel per checkpoint measure against the number of edits, one line per run.

    The panels are the evaluation's metrics (×100, as the summaries print them),
    perplexity, and `‖ΔW_out‖_F / ‖W_out‖_F` of each edited layer (the accumulated change
    relative to the unedited weights): where edits pile up, a method that collapses shows it
    as a fall of the metrics with a rise of perplexity and of the relative change.

    Raises:
        ValueError: a run folder without checkpoints.
    """
    from plotly.subplots import make_subplots  # noqa: PLC0415

    runs = {}
    for d in run_dirs:
        ckpts = read_checkpoints(d)
        if not ckpts:
            raise ValueError(f"{d} has no {CHECKPOINTS}: not a sequential run folder (or not started)")
        label = Path(d).name if Path(d).name not in runs else str(d)  # two folders of one name stay apart
        runs[label] = ckpts
    panels: dict[str, dict[str, tuple[list, list]]] = {}
    for name, ckpts in runs.items():
        for c in ckpts:
            measures = {k: 100 * v for k, v in c["metrics"].items()}
            if "perplexity" in c:
                measures["perplexity"] = c["perplexity"]
            for layer, nm in c["norms"].items():
                measures[f"|dW| / |W| layer {layer}"] = nm["delta_fro"] / nm["w_out_fro"]
            for k, v in measures.items():
                xs, ys = panels.setdefault(k, {}).setdefault(name, ([], []))
                xs.append(c["n_edits"])
                ys.append(v)
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=list(panels), horizontal_spacing=0.08, vertical_spacing=0.12)
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f"]
    for i, (measure, by_run) in enumerate(panels.items()):
        for j, name in enumerate(runs):
            if name in by_run:
                xs, ys = by_run[name]
                fig.add_scatter(x=xs, y=ys, mode="lines+markers", name=name, legendgroup=name, showlegend=i == 0,
                                line={"color": palette[j % len(palette)]}, row=i // cols + 1, col=i % cols + 1)
    fig.update_xaxes(title_text="edits so far")
    fig.update_layout(height=300 * rows, width=1100, title="Sequential editing: measures against the number of edits")
    return fig
