"""A Ray run against a single-process run of the same work (a script, not a test).

Issue 15 asks that the same known facts traced single-process and with `--ray local
--workers 2` give the same per-fact scores (within 1e-6), and the same for CounterFact
records edited with ROME. This reads the two run folders that `python -m tracer --facts`
(or `python -m benchmarks.counterfact`) wrote, and never writes to them.

Run:
    python -m tracer --facts ../shared/data/known_1000.json --n 20 --out runs/single
    python -m tracer --facts ../shared/data/known_1000.json --n 20 --out runs/ray --ray local --workers 2
    python -m benchmarks.ray_equivalence --traces runs/single runs/ray

    python -m benchmarks.counterfact --method rome --n 10 --out runs/cf-single
    python -m benchmarks.counterfact --method rome --n 10 --out runs/cf-ray --ray local --workers 2
    python -m benchmarks.ray_equivalence --records runs/cf-single runs/cf-ray

Prints, and returns: for traces, per kind the max |Δscore| over the facts both folders traced
(`trace_precision.compare_scores`), whether the same facts were found known, and both
`choose_edit_layer` answers; for records, the case_ids both hold, the max |Δ| of every numeric
column, whether the generated texts are equal, and both folders' `model_restored`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from benchmarks.runner import RECORDS, read_rows
from benchmarks.trace_precision import compare_scores
from tracer.dataset import read_run


def compare_traces(a: Path, b: Path) -> dict:
    """Per-fact scores of two `trace_dataset` folders of the same facts.

    Returns:
        `{"scores": compare_scores(...), "known": {"same": bool, "a": n, "b": n},
        "layer": {"a": int, "b": int, "same": bool}}`; the layer is `choose_edit_layer`'s
        answer (the argmax of the MLP curve at the last subject token) from each folder's
        `summary.json`, which `python -m tracer --facts` writes.

    Raises:
        ValueError: a folder that is not a trace run (from `read_run`), or runs of other
            settings (the config's noise, samples, kinds or window differ).
        FileNotFoundError: a folder without `summary.json` (a run that did not finish).
    """
    cfg_a, lines_a = read_run(a)
    cfg_b, lines_b = read_run(b)
    differ = {k: (cfg_a.get(k), cfg_b.get(k)) for k in ("model", "noise_std", "samples", "kinds", "groups", "window", "seed", "method")
              if cfg_a.get(k) != cfg_b.get(k)}
    if differ:
        raise ValueError(f"{a} and {b} were traced with other settings: {differ}")
    if "mlp" not in cfg_a["kinds"] or "last_subject" not in cfg_a["groups"]:
        raise ValueError(f"{a}: the edit layer needs kind 'mlp' at group 'last_subject'; traced {cfg_a['kinds']} at {cfg_a['groups']}")
    known_a = {i for i, r in lines_a.items() if r["correct"]}
    known_b = {i for i, r in lines_b.items() if r["correct"]}
    kinds = cfg_a["kinds"]
    la, lb = _edit_layer(a), _edit_layer(b)
    return {"scores": compare_scores(lines_a, lines_b, kinds),
            "known": {"same": known_a == known_b, "a": len(known_a), "b": len(known_b)},
            "layer": {"a": la, "b": lb, "same": la == lb}}


def _edit_layer(folder: Path) -> int:
    """The argmax of the summary's MLP curve at the last subject token (`choose_from_result`)."""
    summary = json.loads((folder / "summary.json").read_text())
    curve = summary["mlp"]["mean"][summary["groups"].index("last_subject")]
    return max(range(len(curve)), key=lambda layer: -math.inf if curve[layer] is None or math.isnan(curve[layer]) else curve[layer])


def _rows(folder: Path) -> dict:
    """`records.jsonl` keyed by case_id (`runner.read_rows`: a torn last line is left out)."""
    if not (folder / RECORDS).is_file():
        raise FileNotFoundError(f"no {RECORDS} in {folder}")
    return {r["case_id"]: r for r in read_rows(folder / RECORDS)}


def _numbers(x, prefix=""):
    """`{dotted path: float}` of every number in a (nested) record."""
    if isinstance(x, bool):
        return {prefix: float(x)}
    if isinstance(x, (int, float)):
        return {prefix: float(x)}
    if isinstance(x, dict):
        return {k: v for key, val in x.items() for k, v in _numbers(val, f"{prefix}.{key}" if prefix else key).items()}
    if isinstance(x, list):
        return {k: v for i, val in enumerate(x) for k, v in _numbers(val, f"{prefix}[{i}]").items()}
    return {}


TIMING = ("seconds", "edit_seconds")  # wall times: never equal, not compared


def compare_records(a: Path, b: Path) -> dict:
    """Rows of two benchmark folders (`records.jsonl`, keyed by case_id).

    Returns:
        `{"case_ids": n both hold, "only_a": [...], "only_b": [...], "max_abs": {column: float},
        "columns_differ": [paths present in one row only], "texts_equal": bool,
        "model_restored": {"a": ..., "b": ...}}`; `max_abs` is per top-level column (e.g. `es`,
        `nll`), the max over every number under it and every shared record (`inf` where one
        side is NaN and the other is not); `case_id` and the wall times are left out.

    Raises:
        FileNotFoundError: a folder without `records.jsonl` or `summary.json`.
        ValueError: folders of another model, method, batch or hparams.
    """
    sa, sb = (json.loads((f / "summary.json").read_text()) for f in (a, b))
    differ = {k: (sa.get(k), sb.get(k)) for k in ("model", "method", "batch", "hparams") if sa.get(k) != sb.get(k)}
    if differ:
        raise ValueError(f"{a} and {b} are runs of other settings: {differ}")
    ra, rb = _rows(a), _rows(b)
    both = sorted(set(ra) & set(rb))
    max_abs: dict[str, float] = {}
    paths_differ, texts_equal = set(), True
    for cid in both:
        na, nb = _numbers(ra[cid]), _numbers(rb[cid])
        paths_differ |= set(na) ^ set(nb)
        for path in set(na) & set(nb):
            col = path.split(".")[0].split("[")[0]
            if col == "case_id" or col in TIMING:
                continue
            x, y = na[path], nb[path]
            d = 0.0 if math.isnan(x) and math.isnan(y) else math.inf if math.isnan(x) or math.isnan(y) else abs(x - y)
            max_abs[col] = max(max_abs.get(col, 0.0), d)
        texts_equal &= ra[cid].get("text") == rb[cid].get("text")

    return {"case_ids": len(both), "only_a": sorted(set(ra) - set(rb)), "only_b": sorted(set(rb) - set(ra)),
            "max_abs": dict(sorted(max_abs.items())), "columns_differ": sorted(paths_differ), "texts_equal": texts_equal,
            "model_restored": {"a": sa.get("model_restored"), "b": sb.get("model_restored")}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--traces", nargs=2, metavar=("SINGLE", "RAY"), help="two trace_dataset folders of the same facts")
    p.add_argument("--records", nargs=2, metavar=("SINGLE", "RAY"), help="two benchmark folders of the same records")
    args = p.parse_args(argv)
    if not args.traces and not args.records:
        p.error("give --traces and/or --records")
    report = {}
    if args.traces:
        t = report["traces"] = compare_traces(*map(Path, args.traces))
        for k, s in t["scores"].items():
            if isinstance(s, dict):
                print(f"{k:5s}: max |Δscore| {s['max_abs']:.3g} over {s['n_facts']} facts, argmax cell moved in {s['argmax_moved']}")
        print(f"high max |Δ| {t['scores']['high_max_abs']:.3g}, low max |Δ| {t['scores']['low_max_abs']:.3g}; "
              f"known facts {t['known']['a']} / {t['known']['b']} ({'same' if t['known']['same'] else 'DIFFERENT'} ids)")
        print(f"edit layer {t['layer']['a']} / {t['layer']['b']}: {'same' if t['layer']['same'] else 'DIFFERENT'}")
    if args.records:
        r = report["records"] = compare_records(*map(Path, args.records))
        print(f"records: {r['case_ids']} in both, only in one: {r['only_a']} / {r['only_b']}")
        print("max |Δ| per column: " + ", ".join(f"{k} {v:.3g}" for k, v in r["max_abs"].items()))
        print(f"generated texts {'equal' if r['texts_equal'] else 'DIFFER'}; columns in one row only: {r['columns_differ'] or 'none'}; "
              f"model_restored {r['model_restored']['a']} / {r['model_restored']['b']}")
    return report


if __name__ == "__main__":
    main()
