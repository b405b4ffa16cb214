"""Hyperparameter sweep for ROME on a validation slice of CounterFact, resumable.

Presets must be chosen on records that are not the ones reported (DEVELOPERS: tune on dev
records 600-697, report on 0-499). This command scores several ROME configurations on one
slice, without generation (ES, PS, NS and the magnitudes, teacher forced), and writes one
run folder per (configuration, key choice) in the runner's format, so
`python -m benchmarks.compare` reads them like any other run.

The three key choices of `ROMEHParams.key` ("r-rome", "original", "mean-key-shift") share
the key `k*`, the direction `u` and the optimised delta `δ` (`editor.rome.compute_factors`),
so each record's value optimisation runs once per configuration and every key choice is
scored from it: a three-way key comparison costs one optimisation, not three.

A folder `<out>/none` holds the unedited model's scores on the same records.

CLI:
    python -m benchmarks.sweep --start 600 --n 98 --out results/val \\
        --config base: --config c05:clamp_norm_factor=0.5 --keys r-rome,original,mean-key-shift

Example:
    >>> configs = parse_configs(["base:", "L3:layer=3"])
    >>> sorted(configs)
    ['L3', 'base']
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from benchmarks.runner import parse_overrides
from tracer.resume import append_jsonl, read_jsonl

log = logging.getLogger(__name__)


def parse_configs(specs: Sequence[str]) -> dict[str, dict]:
    """`NAME:key=value,key=value` specs (values parsed as JSON) to `{NAME: {field: value}}`.

    Raises:
        ValueError: for a spec without a name, a field without `=`, or a repeated name.
    """
    out: dict[str, dict] = {}
    for spec in specs:
        name, sep, rest = spec.partition(":")
        if not sep or not name or not all(c.isalnum() or c in "-_." for c in name):
            raise ValueError(f"config {spec!r} is not NAME:key=value,... (NAME of letters, digits, '-', '_', '.')")
        if name in out:
            raise ValueError(f"config name {name!r} is given twice")
        items = [i for i in re.split(r",(?=\s*[A-Za-z_]\w*=)", rest) if i]  # commas inside JSON values stay
        try:
            fields = parse_overrides(items, what=f"config {spec!r}:")
        except ValueError as err:
            raise ValueError(str(err).replace("is not KEY=VALUE", "is not key=value")) from None
        out[name] = fields
    return out


def run_sweep(
    model,
    records,
    *,
    out: str | Path,
    configs: dict[str, dict],
    keys: Sequence[str],
    base=None,
    cache_dir=None,
    corpus: str | None = None,
) -> dict[str, tuple[str | None, str | None, list[dict]]]:
    """Score each configuration and key choice on `records`.

    Returns:
        `{folder name: (config name, key, rows)}`; `"none"` maps to `(None, None, rows)`.

    Args:
        model: a TransformerLens model; unchanged when this returns.
        records: `CounterFactRecord`s (the validation slice).
        out: the sweep folder; `<out>/<config>-<key>/records.jsonl` (and `<out>/none`) are
            appended to and resumed (`tracer.resume`'s rule, as `benchmarks.runner`).
        configs: `{name: {ROMEHParams field: value}}` overrides of `base`.
        keys: key choices scored for every configuration.
        base: the `ROMEHParams` overridden (default: the model's preset).
        cache_dir, corpus: for key statistics and context templates.

    Raises:
        ValueError: `keys` not a non-empty subset of `ROME_KEYS`, or a corrupt run file.
        TypeError: an override that is not a `ROMEHParams` field (before any work).
    """
    from benchmarks.counterfact import evaluate_counterfact  # noqa: PLC0415
    from benchmarks.runner import RECORDS, read_rows  # noqa: PLC0415
    from benchmarks.runner import edit_summary  # noqa: PLC0415
    from editor import rome, rome_hparams  # noqa: PLC0415
    from editor.checks import check_edit  # noqa: PLC0415
    from editor.common import base_hash, templates_for  # noqa: PLC0415
    from editor.hparams import ROME_KEYS  # noqa: PLC0415
    from editor.result import LayerDelta, apply_deltas  # noqa: PLC0415
    from editor.stats import layer_stats  # noqa: PLC0415

    out = Path(out)
    base = base or rome_hparams(model)
    folders = {"none": None}
    hps = {}
    bad = [k for k in keys if k not in ROME_KEYS]
    if bad or not keys:
        raise ValueError(f"keys {list(keys)} must be a non-empty subset of {ROME_KEYS}")
    for name, fields in configs.items():
        hps[name] = replace(base, **fields)  # unknown fields raise TypeError here, before any work
        check_edit(model, "rome", [r.request() for r in records], hps[name])  # the editor's own guards
        for k in keys:
            folders[f"{name}-{k}"] = (name, k)
    done = {f: set(read_jsonl(out / f / RECORDS, key="case_id", repair=True)) for f in folders}
    bh = base_hash(model)
    for r in tqdm([r for r in records if r.case_id not in done["none"]], desc="sweep: unedited", unit="rec"):
        append_jsonl(out / "none" / RECORDS, {"case_id": r.case_id, **evaluate_counterfact(model, r, gen_tokens=0)})
    for name, hp in hps.items():
        todo = [r for r in records if any(r.case_id not in done[f"{name}-{k}"] for k in keys)]
        if not todo:
            continue
        C = layer_stats(model, hp.layer, corpus=corpus, n_tokens=hp.mom2_n_tokens, cache_dir=cache_dir, model_hash=bh)
        templates = templates_for(model, hp.context_lengths, cache_dir=cache_dir, model_hash=bh)
        for r in tqdm(todo, desc=f"sweep: {name}", unit="rec"):
            t0 = time.perf_counter()
            f = rome.compute_factors(model, [r.request()], hp, C=C, templates=templates, keys=keys)[0]
            edit_seconds = time.perf_counter() - t0
            for k in keys:
                folder = f"{name}-{k}"
                if r.case_id in done[folder]:
                    continue
                t1 = time.perf_counter()
                delta = LayerDelta(u=f["u"][:, None], v=f["v"][k][None])
                with apply_deltas(model, {hp.layer: delta}, method="rome", requests=[r.request()], model_hash=bh,
                                  diagnostics={"steps": [f["info"]]}) as applied:
                    row = evaluate_counterfact(model, r, gen_tokens=0)
                row = {"case_id": r.case_id, **row, **edit_summary(applied), "delta_norm": f["info"]["delta_norm"],
                       "v_norm": float(f["v"][k].norm()), "edit_seconds": edit_seconds,
                       "seconds": edit_seconds / len(keys) + time.perf_counter() - t1}
                append_jsonl(out / folder / RECORDS, row)
    return {f: (*(folders[f] or (None, None)), read_rows(out / f / RECORDS)) for f in folders}


def summarize(out: str | Path, runs: dict[str, tuple], *, configs: dict, base, command: str, requested: int) -> str:
    """Write each folder's summary (runner format) and return one markdown table of all.

    `runs` is what `run_sweep` returns.
    """
    from benchmarks.counterfact import summarize_counterfact  # noqa: PLC0415
    from benchmarks.runner import markdown_table, write_summary  # noqa: PLC0415

    cols = ["S", "ES", "PS", "NS", "EM", "PM", "NM"]
    summaries = []
    for folder, (name, key, rows) in runs.items():
        meta = {
            "benchmark": "counterfact-sweep",
            "model": "",
            "method": "none" if name is None else "rome",
            "hparams": None if name is None else repr(replace(base, **{**configs[name], "key": key})),
            "gen_tokens": 0,
            "command": command,
        }
        summaries.append(write_summary(out_dir=Path(out) / folder, rows=rows, columns=summarize_counterfact(rows),
                                       column_order=cols, meta=meta, requested=requested))
    return markdown_table(summaries, cols)


def main(argv=None) -> str:
    """Entry point of `python -m benchmarks.sweep`; prints and returns the table.

    Raises:
        SystemExit: bad arguments (argparse exits with status 2).
        ValueError: a malformed or repeated `--config`, bad `--keys`, or overrides the
            hparams refuse; all checked before the model loads.
    """
    from benchmarks import runner  # noqa: PLC0415
    from benchmarks.data import load_counterfact  # noqa: PLC0415
    from editor import rome_hparams  # noqa: PLC0415
    from editor.hparams import ROME_KEYS, ROMEHParams  # noqa: PLC0415
    from tracer.model import add_model_args, load_any  # noqa: PLC0415

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--data", default=None, help="CounterFact JSON (default: shared counterfact_dev.json)")
    ap.add_argument("--start", type=int, required=True, help="first record of the validation slice")
    ap.add_argument("--n", type=int, required=True, help="records in the validation slice")
    ap.add_argument("--out", required=True, help="sweep folder (resumed)")
    ap.add_argument("--config", action="append", required=True, metavar="NAME:key=value,...",
                    help="a configuration: overrides of the model's ROME preset (repeatable; 'base:' is the preset)")
    ap.add_argument("--keys", default="r-rome", help=f"comma-separated key choices, of {ROME_KEYS}")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--corpus", default=None, help="text for key statistics (default: shared WikiText-2 test)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    configs = parse_configs(args.config)
    for name, fields in configs.items():  # every field checked before the model is loaded
        try:
            ROMEHParams(**{"layer": 0, **fields})
        except TypeError as err:
            raise ValueError(f"--config {name}: {err}") from None
    keys = [k.strip() for k in args.keys.split(",") if k.strip()]
    bad = [k for k in keys if k not in ROME_KEYS]
    if bad or not keys:
        raise ValueError(f"--keys {args.keys!r}: expected a comma-separated subset of {ROME_KEYS}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    records = load_counterfact(args.data, n=args.n, start=args.start)
    model = load_any(args.model, loader=args.model_loader, device=args.device)
    base = rome_hparams(model)
    for name, fields in configs.items():
        replace(base, **fields)  # bad fields fail before the model is touched
    rows = run_sweep(model, records, out=args.out, configs=configs, keys=keys, base=base,
                     cache_dir=runner.edit_kwargs(argparse.Namespace(method="rome", cache_dir=args.cache_dir))["cache_dir"],
                     corpus=args.corpus)
    table = summarize(args.out, rows, configs=configs, base=base, command=runner.command_line("benchmarks.sweep", argv),
                      requested=len(records))
    print(table)
    return table


if __name__ == "__main__":
    main()
