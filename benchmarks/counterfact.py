"""CounterFact benchmark: efficacy, generalization, specificity, fluency and consistency of edits.

Per record (see docs/benchmarks.md for how each matches the ROME/MEMIT papers), with
`P(x) = exp(-mean token NLL of x)` after the prompt:

- ES / EM: on the rewrite prompt, `[P(new) > P(true)]` / `P(new) - P(true)`;
- PS / PM: the same, averaged over the paraphrase prompts;
- NS / NM: on the neighborhood prompts, `[P(true) > P(new)]` / `P(true) - P(new)`;
- GE: n-gram entropy of greedy generations from the generation prompts;
- RS: TF-IDF cosine between the generations and reference text about `target_new`.

Summary: means over records ×100 with 95% CIs, S = harmonic mean of ES, PS, NS.

CLI:
    python -m benchmarks.counterfact --model gemma-3-270m --method rome --n 100 --out results/rome

Example:
    >>> from benchmarks.counterfact import evaluate_counterfact
    >>> row = evaluate_counterfact(model, records[0], gen_tokens=0)
    >>> sorted(k for k in row if k.isupper() or len(k) == 2)
    ['em', 'es', 'nm', 'ns', 'pm', 'ps']
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

from benchmarks import metrics as M
from benchmarks.data import CounterFactRecord

log = logging.getLogger(__name__)

RS_FALLBACK = "RS (fallback, not comparable with published RS)"
COLUMNS = ("S", "ES", "PS", "NS", "GE", "RS", "EM", "PM", "NM")


@dataclass(frozen=True, kw_only=True)
class Reference:
    """Reference texts and TF-IDF statistics for the consistency score RS.

    Attributes:
        tfidf: the TF-IDF statistics (ROME's idf.npy + tfidf_vocab.json, or fitted locally).
        snippets: ROME's attribute snippets `{relation_id: {target_id: [texts]}}`; None means
            the fallback reference: the record's attribute prompts completed with `target_new`.
    """

    tfidf: M.Tfidf
    snippets: dict | None = None

    @property
    def fallback(self) -> bool:
        """Whether RS is computed against anything but ROME's snippets and `idf.npy`, so is
        not comparable with the published RS."""
        return self.snippets is None or self.tfidf.label != "ROME idf.npy"

    @property
    def column(self) -> str:
        """The summary column RS is reported under: `"RS"`, or `RS_FALLBACK` when `fallback`."""
        return RS_FALLBACK if self.fallback else "RS"

    def texts(self, record: CounterFactRecord) -> list[str]:
        """The reference texts about `record.target_new` that RS compares generations with.

        ROME's attribute snippets for `(relation_id, target_new_id)` (possibly none), or
        without snippets each attribute prompt followed by `target_new`.
        """
        if self.snippets is not None:
            return list(self.snippets.get(record.relation_id, {}).get(record.target_new_id, []))
        return [f"{p} {record.target_new}" for p in record.attribute_prompts]


def evaluate_counterfact(
    model,
    record: CounterFactRecord,
    *,
    gen_tokens: int = 100,
    reference: Reference | None = None,
    generated: Mapping[str, str] | None = None,
) -> dict:
    """CounterFact metrics of one record on the model as it is now (edited or not).

    Args:
        model: a TransformerLens model.
        record: the CounterFact record.
        gen_tokens: tokens generated per generation prompt for GE/RS; 0 skips generation.
        reference: RS reference; None skips RS.
        generated: generations already made on this same model state, by prompt (see
            `CounterFactEval.prefetch`); prompts not in it are generated here.

    Returns:
        A JSON-ready dict: es, em, ps, pm, ns, nm (fractions / probability differences,
        ROME section 3.3 and Appendix; MEMIT section 5), ge (bits), rs (cosine), the per-prompt
        mean token NLLs (nats) and the generated texts.

    Raises:
        ValueError: a prompt or target the tokenizer refuses (`encode` / `target_ids`: empty,
            longer than `n_ctx`), or `gen_tokens` < 0.

    Example:
        >>> evaluate_counterfact(model, load_counterfact(n=1)[0], gen_tokens=0)["es"]
    """
    groups = {
        "rewrite": [record.rewrite_prompt],
        "paraphrase": list(record.paraphrase_prompts),
        "neighborhood": list(record.neighborhood_prompts),
    }
    prompts = [p for ps in groups.values() for p in ps]
    both = M.target_nll(
        model,
        prompts + prompts,
        [record.target_new] * len(prompts) + [record.target_true] * len(prompts),
    )
    new, true = both[: len(prompts)], both[len(prompts) :]
    row: dict = {"nll": {}}
    k = 0
    for name, ps in groups.items():
        row["nll"][name] = {"new": new[k : k + len(ps)], "true": true[k : k + len(ps)]}
        k += len(ps)
    nl = row["nll"]
    row["es"] = M.success(nl["rewrite"]["new"], nl["rewrite"]["true"])[0]
    row["em"] = M.magnitude(nl["rewrite"]["new"], nl["rewrite"]["true"])[0]
    row["ps"] = M.mean(M.success(nl["paraphrase"]["new"], nl["paraphrase"]["true"]))
    row["pm"] = M.mean(M.magnitude(nl["paraphrase"]["new"], nl["paraphrase"]["true"]))
    row["ns"] = M.mean(M.success(nl["neighborhood"]["true"], nl["neighborhood"]["new"]))
    row["nm"] = M.mean(M.magnitude(nl["neighborhood"]["true"], nl["neighborhood"]["new"]))
    if gen_tokens > 0 and record.generation_prompts:
        unique = list(dict.fromkeys(record.generation_prompts))  # greedy: duplicates give the same text
        gen = {p: generated[p] for p in unique if generated and p in generated}
        todo = [p for p in unique if p not in gen]
        gen |= dict(zip(todo, M.greedy_generate(model, todo, max_new_tokens=gen_tokens)))
        texts = [gen[p] for p in record.generation_prompts]
        row["ge"] = M.mean([M.ngram_entropy(t) for t in texts])
        if reference is not None:
            refs = reference.texts(record)
            if refs:
                row["rs"] = reference.tfidf.similarity(" ".join(texts), " ".join(refs))
        row["text"] = [gen[p] for p in unique]
    return row


class CounterFactEval:
    """`evaluate_counterfact` for the runner, with generation batched across records.

    A generation step streams every weight of the model whatever the batch size, so on a
    CPU 30 prompts cost little more per step than 3. When several records are evaluated on
    the same model state (the unedited baseline, or a batch edit), the runner calls
    `prefetch(model, records)` first; the generations are then made together, in batches of
    `gen_batch` prompts, and each record's evaluation reuses them. Each `prefetch` replaces
    the previous one's texts, so texts from another model state are never reused.

    Example:
        >>> ev = CounterFactEval(gen_tokens=100)
        >>> ev.prefetch(model, records[:10]); rows = [ev(model, r) for r in records[:10]]
    """

    def __init__(self, *, gen_tokens: int = 100, reference: Reference | None = None, gen_batch: int = 32):
        self.gen_tokens, self.reference, self.gen_batch = gen_tokens, reference, gen_batch
        self._texts: dict[str, str] = {}

    def prefetch(self, model, records: Sequence[CounterFactRecord]) -> None:
        """Generate the records' generation prompts together, replacing the texts kept before.

        Each distinct prompt gets `gen_tokens` greedy tokens, `gen_batch` prompts at a time;
        with `gen_tokens <= 0` nothing is generated.

        Args:
            model: the model in the state the next evaluations will see.
            records: the records about to be evaluated.

        Raises:
            ValueError: a generation prompt `encode` refuses (empty, longer than `n_ctx`).
        """
        self._texts = {}
        if self.gen_tokens <= 0:
            return
        prompts = list(dict.fromkeys(p for r in records for p in r.generation_prompts))
        for i in range(0, len(prompts), self.gen_batch):
            chunk = prompts[i : i + self.gen_batch]
            self._texts |= dict(zip(chunk, M.greedy_generate(model, chunk, max_new_tokens=self.gen_tokens)))

    def __call__(self, model, record: CounterFactRecord) -> dict:
        return evaluate_counterfact(model, record, gen_tokens=self.gen_tokens, reference=self.reference, generated=self._texts)


def summarize_counterfact(rows: Sequence[dict], *, rs_column: str = "RS") -> dict:
    """Aggregate per-record rows into the papers' columns (×100) with 95% CI half-widths.

    The columns of ROME section 3.3 and Appendix (and MEMIT section 5): S, the harmonic mean of
    ES, PS and NS; GE; RS; and the magnitudes EM, PM, NM.

    Args:
        rows: per-record rows from `evaluate_counterfact`; rows with an `"error"` are left out.
        rs_column: the name RS is reported under (`Reference.column`).

    Returns:
        `{column: {"mean": float, "ci95": float, "n": int}}` for S, ES, PS, NS, GE, RS
        (named `rs_column`), EM, PM, NM; a column with no values is left out. S is the
        harmonic mean of the ES, PS and NS means (no CI).

    Example:
        >>> summarize_counterfact([{"es": 1.0, "ps": 0.5, "ns": 1.0, "em": .2, "pm": .1, "nm": .0}])["S"]
        {'mean': 75.0, 'ci95': None, 'n': 1}
    """
    ok = [r for r in rows if "error" not in r]
    out: dict = {}
    for col, key in [("ES", "es"), ("PS", "ps"), ("NS", "ns"), ("GE", "ge"), (rs_column, "rs"),
                     ("EM", "em"), ("PM", "pm"), ("NM", "nm")]:
        vals = [r[key] for r in ok if key in r]
        if vals:
            m, ci = M.mean_ci(vals, scale=100.0)
            out[col] = {"mean": m, "ci95": ci, "n": len(vals)}
    if all(c in out for c in ("ES", "PS", "NS")):
        s = M.harmonic_mean([out[c]["mean"] for c in ("ES", "PS", "NS")])
        out = {"S": {"mean": s, "ci95": None, "n": out["ES"]["n"]}, **out}
    return out


def build_reference(args) -> Reference | None:
    """RS reference from the CLI options: ROME's files when given, else the labelled fallback.

    Args:
        args: parsed CLI options with `idf`, `tfidf_vocab`, `snippets` and `wikitext`.

    Returns:
        A `Reference`: TF-IDF from ROME's `idf.npy` + `tfidf_vocab.json`, or fitted on
        WikiText-2 test paragraphs; ROME's attribute snippets when `--snippets` is given.

    Raises:
        ValueError: only one of `--idf` / `--tfidf-vocab`, files that do not match each other
            (`Tfidf.from_files`), or attribute snippets with a missing field.
        FileNotFoundError: no WikiText file (without `--idf`) or a missing file given.
    """
    from benchmarks.data import load_text  # noqa: PLC0415

    if args.idf or args.tfidf_vocab:
        if not (args.idf and args.tfidf_vocab):
            raise ValueError("--idf and --tfidf-vocab must be given together")
        tfidf = M.Tfidf.from_files(args.idf, args.tfidf_vocab)
    else:
        tfidf = M.Tfidf.fit(M.wikitext_documents(load_text(args.wikitext)), label="WikiText-2 test")
    snippets = M.load_attribute_snippets(args.snippets) if args.snippets else None
    return Reference(tfidf=tfidf, snippets=snippets)


def main(argv=None) -> dict:
    """Run `python -m benchmarks.counterfact`: edit and score CounterFact records, resumably.

    Loads the records and the model, edits with `--method` (one record at a time, or
    `--batch` at once), scores each record (`evaluate_counterfact`; metrics of ROME section 3.3
    / Appendix), appends one JSON line per record to `<out>/records.jsonl` (resumed on
    rerun) and writes `summary.json` / `summary.md`, printing the table.

    Args:
        argv: the arguments; None reads `sys.argv`.

    Returns:
        The summary dict (columns ×100 with 95% CIs, perplexity, counts, run metadata).

    Raises:
        SystemExit: bad arguments (argparse exits with status 2), e.g. no `--out`.
        ValueError: records, options or a model the benchmark refuses (a bad record,
            `--n` < 1, an unknown `--method`, a bad `--hparam`, a corrupt `records.jsonl`,
            only one of `--idf` / `--tfidf-vocab`, ...).
        FileNotFoundError: no data file at `--data` (or in the shared data folder).
    """
    from benchmarks import runner  # noqa: PLC0415
    from benchmarks.data import load_counterfact  # noqa: PLC0415

    parser = argparse.ArgumentParser(description="CounterFact benchmark (ROME/MEMIT metrics), resumable")
    runner.add_common_args(parser)
    parser.add_argument("--gen-tokens", type=int, default=100, help="greedy tokens per generation prompt (GE, RS)")
    parser.add_argument("--no-generation", action="store_true", help="skip GE and RS")
    parser.add_argument("--snippets", default=None, help="ROME attribute_snippets.json (RS references)")
    parser.add_argument("--idf", default=None, help="ROME idf.npy (with --tfidf-vocab)")
    parser.add_argument("--tfidf-vocab", default=None, help="ROME tfidf_vocab.json (with --idf)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return _run(args, argv, parser_module="benchmarks.counterfact", load=load_counterfact)


def _run(args, argv, *, parser_module, load) -> dict:
    from benchmarks import runner  # noqa: PLC0415
    from tracer import TL_API  # noqa: PLC0415

    records = runner.select_case_ids(load(args.data, n=args.n, start=args.start), args.case_ids)
    checkpoint_evaluate = CounterFactEval(gen_tokens=0)  # checkpoints: teacher-forced only
    runner.check_run_args(args, records, checkpoint_evaluate=checkpoint_evaluate)  # before the TF-IDF reads WikiText
    gen_tokens = 0 if args.no_generation else args.gen_tokens
    if getattr(args, "final_gen_sample", None) is not None and gen_tokens <= 0:
        raise ValueError(f"--final-gen-sample {args.final_gen_sample} samples the records to generate for, but this run "
                         "generates nothing (--no-generation or --gen-tokens 0)")
    reference = build_reference(args) if gen_tokens > 0 else None
    run = runner.execute(args, records=records, desc=f"counterfact {args.method}",
                         evaluate=CounterFactEval(gen_tokens=gen_tokens, reference=reference),
                         checkpoint_evaluate=checkpoint_evaluate)
    rows, restored, ppl_before = run["rows"], run["restored"], run["ppl_before"]
    rs_column = reference.column if reference else "RS"
    notes = [
        "ES/PS/NS/S/EM/PM/NM/RS ×100; GE = n-gram entropy (bits) ×100; ± is a 95% CI half-width.",
        f"perplexity: WikiText-2 test, first {args.ppl_tokens} tokens; 'after' is the mean over "
        + ("each batch's edited model." if args.batch else f"every {args.ppl_every}-th record's edited model."),
    ]
    if reference is not None:
        notes.append(f"RS reference: {'ROME attribute snippets' if reference.snippets else 'attribute prompts + target_new'}; "
                     f"TF-IDF statistics: {reference.tfidf.label}.")
    meta = {
        "benchmark": "counterfact",
        "model": args.model,
        "method": args.method,
        "batch": args.batch,
        "hparams": run["hparams_record"],
        "gen_tokens": gen_tokens,
        "data": str(args.data or "shared counterfact_dev.json"),
        "transformer_lens_api": TL_API,
        "model_restored": restored,
        "command": runner.command_line(parser_module, argv),
        **run.get("meta", {}),
    }
    summary = runner.write_summary(
        out_dir=args.out,
        rows=rows,
        columns=summarize_counterfact(rows, rs_column=rs_column),
        column_order=[rs_column if c == "RS" else c for c in COLUMNS],
        meta=meta,
        requested=len(records),
        ppl_before=ppl_before,
        notes=notes,
    )
    print(runner.markdown_table([summary], [rs_column if c == "RS" else c for c in COLUMNS]))
    return summary


if __name__ == "__main__":
    main()
