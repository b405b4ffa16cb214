"""zsRE benchmark: efficacy, paraphrase and specificity as teacher-forced token accuracy.

As in ROME's `eval_utils_zsre`: for each target token, the model's argmax given the prompt
and the previous target tokens must equal that token; a record's score is the mean over
its target tokens, and the summary is the mean over records ×100.

- Efficacy: question `src` → `answers[0]` (ROME's edit target for zsRE);
- Paraphrase: `rephrase` → `answers[0]`;
- Specificity: `loc + "?"` → `loc_ans` (an unrelated Natural Questions fact).

CLI:
    python -m benchmarks.zsre --model gemma-3-270m --method rome --n 100 --out results/zsre-rome

Example:
    >>> from benchmarks.zsre import evaluate_zsre
    >>> evaluate_zsre(model, load_zsre(n=1)[0])["efficacy"]
    0.0
"""

from __future__ import annotations

import argparse
import logging
from typing import Sequence

from benchmarks import metrics as M
from benchmarks.data import ZsreRecord

log = logging.getLogger(__name__)

COLUMNS = ("Efficacy", "Paraphrase", "Specificity")


def evaluate_zsre(model, record: ZsreRecord) -> dict:
    """zsRE token accuracies of one record on the model as it is now (ROME section 3.2, zsRE; MEMIT section 5).

    Args:
        model: a TransformerLens model with a tokenizer (edited or not).
        record: the zsRE record.

    Returns:
        `{"efficacy", "paraphrase", "specificity"}`, each the fraction of target tokens
        predicted (argmax, teacher forced) in [0, 1], plus `"hits"`: the per-token booleans
        of the three prompts.

    Raises:
        ValueError: a prompt or target `encode` / `target_ids` refuse (empty, longer than
            `n_ctx`).

    Example:
        >>> evaluate_zsre(model, load_zsre(n=1)[0])["efficacy"]
    """
    hits = M.teacher_forced_correct(
        model,
        [record.rewrite_prompt, record.rephrase, record.loc + "?"],
        [record.target_new, record.target_new, record.loc_ans],
    )
    return {
        "efficacy": M.mean(hits[0]),
        "paraphrase": M.mean(hits[1]),
        "specificity": M.mean(hits[2]),
        "hits": hits,
    }


def summarize_zsre(rows: Sequence[dict]) -> dict:
    """Means over records ×100 with 95% CI half-widths.

    Args:
        rows: per-record rows from `evaluate_zsre`; rows with an `"error"` are left out.

    Returns:
        `{column: {"mean": float, "ci95": float, "n": int}}` for Efficacy, Paraphrase and
        Specificity (percentages; `ci95` NaN with one record); a column with no values is
        left out.

    Example:
        >>> summarize_zsre([{"efficacy": 1.0, "paraphrase": 0.5, "specificity": 0.0}])["Paraphrase"]["mean"]
        50.0
    """
    ok = [r for r in rows if "error" not in r]
    out = {}
    for col in COLUMNS:
        vals = [r[col.lower()] for r in ok if col.lower() in r]
        if vals:
            m, ci = M.mean_ci(vals, scale=100.0)
            out[col] = {"mean": m, "ci95": ci, "n": len(vals)}
    return out


def main(argv=None) -> dict:
    """Run `python -m benchmarks.zsre`: edit and score zsRE records, resumably.

    Loads the records and the model, edits with `--method` (one record at a time, or
    `--batch` at once), scores each record (`evaluate_zsre`), appends one JSON line per
    record to `<out>/records.jsonl` (resumed on rerun) and writes `summary.json` /
    `summary.md`, printing the table.

    Takes `argv` (None reads `sys.argv`), returns the summary dict and raises as
    `benchmarks.counterfact.main` does (SystemExit for bad arguments, ValueError for records,
    options or a model the benchmark refuses).
        FileNotFoundError: no data file at `--data` (or in the shared data folder).
    """
    from benchmarks import runner  # noqa: PLC0415
    from benchmarks.data import load_zsre  # noqa: PLC0415
    from tracer import TL_API  # noqa: PLC0415

    parser = argparse.ArgumentParser(description="zsRE benchmark (ROME/MEMIT token accuracy), resumable")
    runner.add_common_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    records = runner.select_case_ids(load_zsre(args.data, n=args.n, start=args.start), args.case_ids)
    run = runner.execute(args, records=records, evaluate=evaluate_zsre, desc=f"zsre {args.method}")
    rows, restored, ppl_before = run["rows"], run["restored"], run["ppl_before"]
    meta = {
        "benchmark": "zsre",
        "model": args.model,
        "method": args.method,
        "batch": args.batch,
        "hparams": run["hparams_record"],
        "data": str(args.data or "shared zsre_dev.json"),
        "transformer_lens_api": TL_API,
        "model_restored": restored,
        "command": runner.command_line("benchmarks.zsre", argv),
        **run.get("meta", {}),
    }
    notes = [
        "Token accuracy ×100 (teacher forced), mean over records; ± is a 95% CI half-width.",
        f"perplexity: WikiText-2 test, first {args.ppl_tokens} tokens; 'after' is the mean over "
        + ("each batch's edited model." if args.batch else f"every {args.ppl_every}-th record's edited model."),
    ]
    summary = runner.write_summary(
        out_dir=args.out,
        rows=rows,
        columns=summarize_zsre(rows),
        column_order=COLUMNS,
        meta=meta,
        requested=len(records),
        ppl_before=ppl_before,
        notes=notes,
    )
    print(runner.markdown_table([summary], COLUMNS))
    return summary


if __name__ == "__main__":
    main()
