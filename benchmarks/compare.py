"""Compare finished runs: one markdown table across run directories (and optionally a plotly figure).

CLI:
    python -m benchmarks.compare results/cf-none results/cf-rome [--html compare.html]

Example:
    >>> from benchmarks.compare import compare
    >>> print(compare(["results/cf-none", "results/cf-rome"]))
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

from benchmarks.runner import atomic_write_text, comparison_figure, load_summaries, markdown_table


def _columns(summaries: Sequence[dict]) -> list[str]:
    cols: list[str] = []
    for s in summaries:
        for c in s["columns"]:
            if c not in cols:
                cols.append(c)
    return cols


def compare(run_dirs: Sequence[str | os.PathLike], html: str | os.PathLike | None = None) -> str:
    """A markdown table with one row per run (union of their columns); writes a figure to `html` if given."""
    if not run_dirs:
        raise ValueError("run_dirs is empty; expected at least one run directory")
    summaries = load_summaries(run_dirs)
    benches = {s.get("benchmark") for s in summaries}
    if len(benches) > 1:
        raise ValueError(f"run_dirs mix benchmarks {sorted(map(str, benches))}; compare one benchmark at a time")
    cols = _columns(summaries)
    if html is not None:
        atomic_write_text(html, comparison_figure(summaries, cols).to_html(include_plotlyjs="cdn"))
    return markdown_table(summaries, cols)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="One table across benchmark runs")
    parser.add_argument("runs", nargs="+", help="run directories holding summary.json")
    parser.add_argument("--html", default=None, help="also write a plotly comparison figure here")
    args = parser.parse_args(argv)
    print(compare(args.runs, html=args.html), end="")


if __name__ == "__main__":
    main()
