"""Compare finished runs: one markdown table across run directories (and optionally a plotly figure).

CLI:
    python -m benchmarks.compare results/cf-none results/cf-rome [--html compare.html] [--common]
        [--plotly-js shared/plotly.min.js]

`--common` recomputes every run's columns from its `records.jsonl` over only the records
that all the runs finished (paired comparison when runs stopped at different points).

Example:
    >>> from benchmarks.compare import compare
    >>> print(compare(["results/cf-none", "results/cf-rome"]))
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

from pathlib import Path

from benchmarks.runner import RECORDS, comparison_figure, load_summaries, markdown_table, read_rows
from tracer.result import save_figure


def restrict_to_common(run_dirs: Sequence[str | os.PathLike], summaries: list[dict]) -> list[dict]:
    """Summaries recomputed over the case_ids that every run finished without error (a paired comparison).

    Args:
        run_dirs: the run folders, each holding `records.jsonl`.
        summaries: their `summary.json` contents, in the same order (`load_summaries`).

    Returns:
        One summary per run with `columns` (means ×100 with 95% CIs, as the benchmark's
        summarizer gives them) and `records_evaluated` recomputed over the common records;
        for MQuAKE also `breakdown` (known chains, hops) and `cases_known_chain`.

    Raises:
        ValueError: the runs share no finished record, a summary names a benchmark other
            than "counterfact", "counterfact-sweep", "zsre" or "mquake", or a `records.jsonl`
            is corrupt (`read_rows`).

    Example:
        >>> restrict_to_common(["results/cf-none", "results/cf-rome"], load_summaries([...]))
    """
    rows = [[r for r in read_rows(Path(d) / RECORDS) if "error" not in r] for d in run_dirs]
    common = set.intersection(*[{r["case_id"] for r in rs} for rs in rows])
    if not common:
        raise ValueError(f"run_dirs {list(map(str, run_dirs))} share no finished record")
    out = []
    for s, rs in zip(summaries, rows):
        keep = [r for r in rs if r["case_id"] in common]
        out.append({**s, **_summarize_rows(s, keep), "records_evaluated": len(keep)})
    return out


def _summarize_rows(summary: dict, rows: list[dict]) -> dict:
    """`columns` of `summary`'s benchmark recomputed over `rows`; for MQuAKE also its breakdown."""
    bench = summary["benchmark"]
    if bench in ("counterfact", "counterfact-sweep"):  # a sweep's folders hold CounterFact rows
        from benchmarks.counterfact import summarize_counterfact  # noqa: PLC0415

        rs_col = next((c for c in summary["columns"] if c.startswith("RS")), "RS")  # keep the run's RS@k
        return {"columns": summarize_counterfact(rows, rs_column=rs_col)}
    if bench == "zsre":
        from benchmarks.zsre import summarize_zsre  # noqa: PLC0415

        return {"columns": summarize_zsre(rows)}
    if bench == "mquake":  # one pass gives the columns and the breakdown (known chains, hops)
        from benchmarks.mquake import summarize_mquake  # noqa: PLC0415

        full = summarize_mquake(rows)
        return {"columns": full["columns"], "breakdown": full["breakdown"],
                "cases_known_chain": full["breakdown"]["known"]["cases"]}
    raise ValueError(f"benchmark {bench!r} has no summarizer; expected 'counterfact', 'counterfact-sweep', "
                     "'zsre' or 'mquake'")


def _columns(summaries: Sequence[dict]) -> list[str]:
    cols: list[str] = []
    for s in summaries:
        for c in s["columns"]:
            if c not in cols:
                cols.append(c)
    return cols


def compare(
    run_dirs: Sequence[str | os.PathLike],
    html: str | os.PathLike | None = None,
    *,
    common: bool = False,
    plotly_js: str | os.PathLike | None = None,
) -> str:
    """A markdown table with one row per run (union of their columns); writes a figure to `html` if given.

    With `common`, columns are recomputed over the records every run finished. The figure
    loads plotly.js offline from `plotly.min.js` beside `html` (written once per folder), or
    from the shared file `plotly_js` (by its relative path) when given.

    Args:
        run_dirs: finished run folders of one benchmark, each holding `summary.json`.
        html: where to write a plotly bar chart of the columns (with 95% CIs); None: none.
        common: recompute every run's columns over the records all runs finished.
        plotly_js: a shared `plotly.min.js` the figure loads (written if missing).

    Returns:
        The markdown table: one row per run, the metric columns (×100) then perplexity
        before/after, records, failures and records per minute.

    Raises:
        ValueError: `run_dirs` is empty, a run has no `summary.json`, the runs mix
            benchmarks, `common` finds no shared record (`restrict_to_common`), or `html`
            has an unsupported suffix (`tracer.result.save_figure`).

    Example:
        >>> print(compare(["results/cf-none", "results/cf-rome"], html="compare.html"))
    """
    if not run_dirs:
        raise ValueError("run_dirs is empty; expected at least one run directory")
    summaries = load_summaries(run_dirs)
    benches = {s.get("benchmark") for s in summaries}
    if len(benches) > 1:
        raise ValueError(f"run_dirs mix benchmarks {sorted(map(str, benches))}; compare one benchmark at a time")
    if common:
        summaries = restrict_to_common(run_dirs, summaries)
    cols = _columns(summaries)
    if html is not None:
        save_figure(comparison_figure(summaries, cols), html, plotly_js=plotly_js)
    return markdown_table(summaries, cols)


def main(argv=None) -> None:
    """Run `python -m benchmarks.compare`: print one markdown table across run folders (`compare`).

    Args:
        argv: the arguments (run folders, `--html`, `--common`, `--plotly-js`); None reads
            `sys.argv`.

    Raises:
        SystemExit: bad arguments (argparse exits with status 2), e.g. no run folder.
        ValueError: run folders `compare` refuses (no `summary.json`, mixed benchmarks, ...).
    """
    parser = argparse.ArgumentParser(description="One table across benchmark runs")
    parser.add_argument("runs", nargs="+", help="run directories holding summary.json")
    parser.add_argument("--html", default=None, help="also write a plotly comparison figure here")
    parser.add_argument("--common", action="store_true", help="recompute over the records every run finished")
    parser.add_argument("--plotly-js", default=None, metavar="PATH",
                        help="with --html: load this shared plotly.min.js (written if missing) instead of one beside it")
    parser.add_argument("--collapse", default=None, metavar="HTML",
                        help="sequential runs: also write their collapse curves, overlaid, here")
    args = parser.parse_args(argv)
    print(compare(args.runs, html=args.html, common=args.common, plotly_js=args.plotly_js), end="")
    if args.collapse:
        from benchmarks.sequential import collapse_figure  # noqa: PLC0415

        save_figure(collapse_figure(args.runs), args.collapse, plotly_js=args.plotly_js)


if __name__ == "__main__":
    main()
