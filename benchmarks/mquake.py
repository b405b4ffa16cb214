"""MQuAKE benchmark: are edited facts used in multi-hop questions? (Zhong et al. 2023)

Per case, on the same cases before and after editing (every number ×100 in the summary):

- **Edit-wise success (ES)**: for each requested rewrite, on its cloze (prompt with the
  subject filled in), `P(target_new) > P(target_true)` with `P = exp(-mean token NLL)` of the
  whole answer: the rule of CounterFact's efficacy ES (`benchmarks.counterfact`,
  `metrics.success`), not a first-token comparison. Pooled over the rewrites (MQuAKE counts
  edits, not cases).
- **Instance-wise hop accuracy (Hop)**: every hop cloze is answered with its answer or an
  alias (`new_single_hops` after editing, `single_hops` before). A cloze is answered when
  the normalised greedy continuation of up to `gen_tokens` tokens starts with a normalised
  answer at a word boundary (`normalize_answer`: NFKC, lowercase, punctuation and symbols
  deleted, the articles a/an/the dropped, whitespace collapsed; `matches`).
- **Multi-hop accuracy, generation (MH)**: at least one of the case's questions is answered
  with `new_answer` or an alias (before editing: `answer`). Each question follows a few-shot
  prompt of hand-written multi-hop demonstrations (`DEMOS`, none of them an MQuAKE case; the
  evaluator refuses cases whose questions are among them); the answer is the greedy
  continuation up to its first newline, matched as above.
- **Multi-hop accuracy, likelihood (MH-lik)**: under the same question prompts, the mean
  over the questions of the teacher-forced mean token log-probability of `new_answer`
  against that of `answer`; a case scores 1 when the new answer wins. A small model moves
  this before it moves generation.
- **Known chains**: every metric is also reported over the cases whose `single_hops` the
  unedited model answers all correctly (Hop before = 1), with both counts, and broken down
  by the number of hops (2, 3, 4).

Before and after. The shared runner (`runner.run_records`) evaluates each record after its
edit is applied, and its `prefetch` hook also sees the edited model, so the unedited pass
is a run of its own: `--method none` through the same runner, written under
`<out>/before/records.jsonl` (resumable like any run; `runner.execute(unedited=...)`) before
the edit run starts. The edit
run's evaluation then puts both on one line: `{"before": ..., "after": ..., "known_chain",
"n_hops"}`. The `none` method needs no second pass: both stages are scored on the unedited
model in one run (its "after" says how often the unedited model already gives the new
answers). An MQuAKE case's `.request()` is the tuple of its 1-4 rewrites, which the runner
flattens (`runner.requests_of`): without `--batch` one case's rewrites are edited together,
with `--batch K` the K cases' rewrites are (MEMIT or AlphaEdit in one solve; ROME one
request after another, each computed on the model holding the earlier ones).

CLI:
    python -m benchmarks.mquake --model gemma-3-270m --method rome --n 300 --out results/mquake-rome

Example:
    >>> from benchmarks.mquake import MquakeEval
    >>> ev = MquakeEval(stages=("before", "after"))
    >>> row = ev(model, load_mquake(n=1)[0])
    >>> sorted(row["after"])[:3]
    ['answer_text', 'es', 'hop']
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import unicodedata
from pathlib import Path
from typing import Sequence

from benchmarks import metrics as M
from benchmarks.data import MquakeRecord

log = logging.getLogger(__name__)

STAGES = ("before", "after")
METRICS = ("ES", "Hop", "MH", "MH-lik")
COLUMNS = tuple(f"{m}{s}" for s in ("", " (known)") for m in METRICS)
"""The main table's columns: the after-edit metrics over all cases, then over known chains."""

DEMOS: tuple[tuple[str, str], ...] = (
    ("What is the capital of the country where the Eiffel Tower is located?", "Paris"),
    ("Which language is spoken in the country whose capital is Madrid?", "Spanish"),
    ("On which continent is the country that Mount Fuji is in?", "Asia"),
    ("Who founded the company that makes the iPhone?", "Steve Jobs"),
)
"""Hand-written multi-hop demonstrations for the few-shot question prompt (not MQuAKE cases)."""

_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


# --------------------------------------------------------------------------- answer matching


def normalize_answer(text: str) -> str:
    """Normalise an answer for matching (as SQuAD's exact match): NFKC, lowercase,
    punctuation and symbols deleted, the articles a/an/the dropped, whitespace collapsed.

    Example:
        >>> normalize_answer("  The U.S.A.! ")
        'usa'
        >>> normalize_answer("Ｃroatia")  # a full-width letter (NFKC)
        'croatia'
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(c for c in text if not unicodedata.category(c).startswith(("P", "S")))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def matches(generated: str, answers: Sequence[str]) -> bool:
    """Whether the normalised `generated` text starts with a normalised answer, at a word boundary.

    Args:
        generated: the model's continuation (the prompt not included).
        answers: the answer and its aliases.

    Returns:
        True when some answer (non-empty after normalisation) is a whole-word prefix.

    Example:
        >>> matches(" the United States, and", ["United States of America", "United States"])
        True
        >>> matches(" Croatian wine", ["Croatia"])
        False
    """
    gen = normalize_answer(generated)
    for a in answers:
        a = normalize_answer(a)
        if a and (gen == a or gen.startswith(a + " ")):
            return True
    return False


def question_prompt(question: str, shots: int = len(DEMOS)) -> str:
    """The few-shot prompt for one multi-hop question: `shots` demonstrations, then the question.

    Example:
        >>> question_prompt("Who is the head of state of France?", shots=1)
        'Q: What is the capital of the country where the Eiffel Tower is located?\\nA: Paris\\nQ: Who is the head of state of France?\\nA:'
    """
    lines = [f"Q: {q}\nA: {a}\n" for q, a in DEMOS[:shots]]
    return "".join(lines) + f"Q: {question}\nA:"


def first_line(text: str) -> str:
    """The answer part of a question continuation: up to its first newline."""
    return text.split("\n", 1)[0]


# --------------------------------------------------------------------------- model calls


def generate_continuations(model, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations only (prompt not included), decoded; one per prompt.

    The same greedy decoding as `metrics.greedy_generate` (`tracer.model.greedy_tokens`).

    Raises:
        ValueError: `max_new_tokens` < 1, or a prompt `encode` refuses (empty, too long).
    """
    from tracer import encode  # noqa: PLC0415
    from tracer.model import greedy_tokens  # noqa: PLC0415

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} must be >= 1")
    if not prompts:
        return []
    seqs = [encode(model, p) for p in prompts]
    new = greedy_tokens(model, seqs, max_new_tokens)
    return [model.tokenizer.decode(c, skip_special_tokens=True) for c in new]


# --------------------------------------------------------------------------- evaluation


class MquakeEval:
    """MQuAKE metrics of one case on the model as it is now, for the runner.

    `stages` are the ones scored on this model state: `("before", "after")` for the
    unedited model of a `none` run, `("before",)` for the unedited pass of an edit run,
    `("after",)` for the edit run, whose "before" comes from `before_rows`. Greedy
    continuations and teacher-forced NLLs are computed together for the records of one
    `prefetch` (one model state; the runner calls it after each edit) and reused within
    it, so a pair both stages need is scored once. Without `prefetch`, each call computes
    what it lacks and keeps it: call `prefetch` again after changing the model.

    Args:
        stages: which stages to score ("before": original chain and answer; "after": new).
        gen_tokens: greedy tokens per cloze and per question.
        shots: demonstrations in the question prompt (`DEMOS[:shots]`).
        gen_batch: prompts per generation batch.
        before_rows: `{case_id: row}` of the unedited pass (for `stages=("after",)`).

    Raises:
        ValueError: `gen_tokens` < 1, `shots` outside `[0, len(DEMOS)]`, an unknown stage;
            when called, a case whose question is one of the demonstrations, or (after
            only) a case without a row in `before_rows`.

    Example:
        >>> ev = MquakeEval(stages=("before", "after"), gen_tokens=8)
        >>> ev.prefetch(model, records[:10]); rows = [ev(model, r) for r in records[:10]]
    """

    def __init__(self, *, stages: Sequence[str] = STAGES, gen_tokens: int = 8, shots: int = len(DEMOS),
                 gen_batch: int = 32, before_rows: dict | None = None):
        if gen_tokens < 1:
            raise ValueError(f"gen_tokens {gen_tokens} must be >= 1")
        if not 0 <= shots <= len(DEMOS):
            raise ValueError(f"shots {shots} must be in [0, {len(DEMOS)}]")
        bad = [s for s in stages if s not in STAGES]
        if bad or not stages:
            raise ValueError(f"stages {tuple(stages)} must be a non-empty subset of {STAGES}")
        self.stages, self.gen_tokens, self.shots, self.gen_batch = tuple(stages), gen_tokens, shots, gen_batch
        self.before_rows = before_rows or {}
        self._texts: dict[str, str] = {}
        self._nll: dict[tuple[str, str], float] = {}

    def _prompts(self, record: MquakeRecord) -> list[str]:
        hops = [h.cloze for s in self.stages for h in (record.single_hops if s == "before" else record.new_single_hops)]
        return list(dict.fromkeys(hops + [question_prompt(q, self.shots) for q in record.questions]))

    def _pairs(self, record: MquakeRecord) -> list[tuple[str, str]]:
        """The (prompt, target) pairs `__call__` scores, in its order: each rewrite's cloze with
        its new then its true target, then each question prompt with the new then the old
        answer. Both stages need the same pairs."""
        qprompts = [question_prompt(q, self.shots) for q in record.questions]
        return ([(rw.cloze, rw.target_new) for rw in record.rewrites]
                + [(rw.cloze, rw.target_true) for rw in record.rewrites]
                + [(q, record.new_answer) for q in qprompts] + [(q, record.answer) for q in qprompts])

    def prefetch(self, model, records: Sequence[MquakeRecord]) -> None:
        """Generate every cloze and question prompt of `records`, and score every (prompt,
        target) pair, together, replacing what was kept before (another model state).

        Prompts and pairs go in batches of similar length (sorted by characters), so that a
        few-shot question prompt does not pad a batch of short clozes; each pair is scored
        once for both stages.
        """
        self._texts, self._nll = {}, {}
        self._generate(model, [p for r in records for p in self._prompts(r)])
        self._pair_nll(model, [p for r in records for p in self._pairs(r)])

    def _generate(self, model, prompts: Sequence[str]) -> list[str]:
        todo = sorted((p for p in dict.fromkeys(prompts) if p not in self._texts), key=len)
        for i in range(0, len(todo), self.gen_batch):
            chunk = todo[i : i + self.gen_batch]
            self._texts |= dict(zip(chunk, generate_continuations(model, chunk, self.gen_tokens)))
        return [self._texts[p] for p in prompts]

    def _pair_nll(self, model, pairs: Sequence[tuple[str, str]]) -> list[float]:
        todo = sorted((p for p in dict.fromkeys(pairs) if p not in self._nll), key=lambda p: len(p[0]) + len(p[1]))
        if todo:
            self._nll |= dict(zip(todo, M.target_nll(model, [p for p, _ in todo], [t for _, t in todo])))
        return [self._nll[p] for p in pairs]

    def __call__(self, model, record: MquakeRecord) -> dict:
        demo_qs = {q for q, _ in DEMOS[: self.shots]}
        if demo_qs & set(record.questions):
            raise ValueError(f"mquake case case_id={record.case_id}: a question is one of the few-shot DEMOS")
        row: dict = {"n_hops": record.n_hops}
        for stage in self.stages:
            row[stage] = self.stage(model, record, stage)
        if "before" not in self.stages:
            if record.case_id not in self.before_rows:
                raise ValueError(f"mquake case case_id={record.case_id} has no row in the unedited pass")
            row["before"] = self.before_rows[record.case_id]["before"]
        row["known_chain"] = row["before"]["instance"] == 1.0
        return row

    def stage(self, model, record: MquakeRecord, stage: str) -> dict:
        """One stage's metrics of `record` on the model as it is now.

        Returns:
            `{"es": [per rewrite 0/1], "hop": [per hop 0/1], "instance": 0/1, "mh_q":
            [per question 0/1], "mh_gen": 0/1, "mh_lik": 0/1, "hop_text", "answer_text",
            "nll": {"rewrite_new", "rewrite_true", "answer_new", "answer_old"}}`; NLLs in nats.
        """
        hops = record.single_hops if stage == "before" else record.new_single_hops
        answers = record.answers if stage == "before" else record.new_answers
        qprompts = [question_prompt(q, self.shots) for q in record.questions]
        texts = self._generate(model, [h.cloze for h in hops] + qprompts)
        hop_text, q_text = texts[: len(hops)], [first_line(t) for t in texts[len(hops) :]]
        hop = [float(matches(t, h.answers)) for t, h in zip(hop_text, hops)]
        mh_q = [float(matches(t, answers)) for t in q_text]
        nq, nr = len(qprompts), len(record.rewrites)
        nll = self._pair_nll(model, self._pairs(record))
        rw_new, rw_true = nll[:nr], nll[nr : 2 * nr]
        a_new, a_old = nll[2 * nr : 2 * nr + nq], nll[2 * nr + nq :]
        return {
            "es": M.success(rw_new, rw_true),
            "hop": hop,
            "instance": float(all(hop)),
            "mh_q": mh_q,
            "mh_gen": float(any(mh_q)),
            "mh_lik": float(M.mean(a_new) < M.mean(a_old)),
            "hop_text": hop_text,
            "answer_text": q_text,
            "nll": {"rewrite_new": rw_new, "rewrite_true": rw_true, "answer_new": a_new, "answer_old": a_old},
        }


# --------------------------------------------------------------------------- summary


def _stat(values: Sequence[float]) -> dict | None:
    if not values:
        return None
    m, ci = M.mean_ci(values, scale=100.0)
    return {"mean": m, "ci95": ci, "n": len(values)}


def metric_values(rows: Sequence[dict], stage: str) -> dict[str, list[float]]:
    """Per-metric values of `rows` at `stage`: ES pooled over rewrites, the rest one per case."""
    return {
        "ES": [v for r in rows for v in r[stage]["es"]],
        "Hop": [r[stage]["instance"] for r in rows],
        "MH": [r[stage]["mh_gen"] for r in rows],
        "MH-lik": [r[stage]["mh_lik"] for r in rows],
    }


def summarize_mquake(rows: Sequence[dict]) -> dict:
    """Means ×100 with 95% CI half-widths, before and after, over all cases, the known
    chains and each number of hops.

    Args:
        rows: per-case rows from `MquakeEval`; rows with an `"error"` are left out.

    Returns:
        `{"columns": {column: stat}, "breakdown": {subset: {"cases": n, "before": {metric:
        stat}, "after": {metric: stat}}}}` where a stat is `{"mean", "ci95", "n"}` (None when
        the subset is empty), the subsets are "all", "known", "2 hops", "3 hops", "4 hops",
        "known, 2 hops", ... (those with cases), and the columns are `COLUMNS` (after editing).

    Example:
        >>> row = {"n_hops": 2, "known_chain": True, **{s: {"es": [1.0, 0.0], "instance": 1.0,
        ...        "mh_gen": 0.0, "mh_lik": 1.0} for s in ("before", "after")}}
        >>> summarize_mquake([row])["columns"]["ES"]["mean"]
        50.0
    """
    ok = [r for r in rows if "error" not in r]
    subsets: dict[str, list[dict]] = {"all": ok, "known": [r for r in ok if r["known_chain"]]}
    for k in sorted({r["n_hops"] for r in ok}):
        subsets[f"{k} hops"] = [r for r in ok if r["n_hops"] == k]
        subsets[f"known, {k} hops"] = [r for r in ok if r["n_hops"] == k and r["known_chain"]]
    breakdown = {
        name: {"cases": len(rs), **{s: {m: _stat(v) for m, v in metric_values(rs, s).items()} for s in STAGES}}
        for name, rs in subsets.items()
    }
    columns = {}
    for suffix, name in (("", "all"), (" (known)", "known")):
        for m in METRICS:
            if breakdown[name]["after"][m] is not None:
                columns[m + suffix] = breakdown[name]["after"][m]
    return {"columns": columns, "breakdown": breakdown}


def _cell(stat: dict | None) -> str:
    if stat is None:
        return "-"
    ci = stat.get("ci95")
    return f"{stat['mean']:.1f}" if ci is None or math.isnan(ci) else f"{stat['mean']:.1f} ± {ci:.1f}"


def breakdown_table(breakdown: dict) -> str:
    """Markdown: one row per subset, before → after for each metric, with the case count."""
    head = ["cases", "n", *[f"{m} {s}" for m in METRICS for s in STAGES]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, b in breakdown.items():
        cells = [name, str(b["cases"])] + [_cell(b[s][m]) for m in METRICS for s in STAGES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- running


def check_args(args, n_records: int) -> None:
    """Refuse options the MQuAKE run cannot honour, before the model is loaded.

    Raises:
        ValueError: `--batch` larger than the number of cases (or below 1), or `--sequential`
            (not supported here).
    """
    if getattr(args, "sequential", False):
        raise ValueError("--sequential is not supported by benchmarks.mquake")
    if args.batch is not None and not 1 <= args.batch <= n_records:
        raise ValueError(f"--batch {args.batch} must be between 1 and the number of cases ({n_records})")


def execute(args, records: Sequence[MquakeRecord]) -> dict:
    """`runner.execute` with MQuAKE's evaluators: for an edit method, the unedited pass
    (stage "before", under `<out>/before/`) runs first and the edit run scores stage
    "after" beside it; the `none` method scores both stages in one run.

    Returns:
        `runner.execute`'s dict (`rows`, `restored`, `ppl_before`, `hparams_record`, ...).

    Raises:
        ValueError: an unknown method or bad `--hparam` (`runner`), a corrupt records file.
    """
    from benchmarks import runner  # noqa: PLC0415

    common = {"gen_tokens": args.gen_tokens, "shots": args.shots}
    unedited = (
        MquakeEval(stages=("before",), **common),
        lambda before: MquakeEval(stages=("after",), before_rows={r["case_id"]: r for r in before}, **common),
    )
    return runner.execute(args, records=records, evaluate=MquakeEval(stages=STAGES, **common),
                          desc=f"mquake {args.method}", unedited=unedited)


def main(argv=None) -> dict:
    """Run `python -m benchmarks.mquake`: edit MQuAKE cases and score them before and after, resumably.

    Loads and validates the cases (a bad case stops the run before anything is written),
    checks `--batch`, loads the model, runs `execute`, appends one JSON line per case to
    `<out>/records.jsonl` and writes `summary.json` / `summary.md` / `figure.html`, printing
    the tables.

    Args:
        argv: the arguments; None reads `sys.argv`.

    Returns:
        The summary dict (columns ×100 with 95% CIs, the `breakdown`, counts, run metadata).

    Raises:
        SystemExit: bad arguments (argparse exits with status 2).
        ValueError: a bad case (naming its case_id), `--batch` larger than the number of
            cases, `--sequential`, an unknown `--method`, a bad `--hparam`, a corrupt
            `records.jsonl`.
        FileNotFoundError: no data file at `--data` (or in the shared data folder).
    """
    from benchmarks import runner  # noqa: PLC0415
    from benchmarks.data import load_mquake  # noqa: PLC0415
    from tracer import TL_API  # noqa: PLC0415
    from tracer.files import atomic_write_text  # noqa: PLC0415

    parser = argparse.ArgumentParser(description="MQuAKE multi-hop benchmark of edits, resumable")
    runner.add_common_args(parser)
    parser.add_argument("--gen-tokens", type=int, default=8, help="greedy tokens per hop cloze and per question")
    parser.add_argument("--shots", type=int, default=len(DEMOS), help=f"few-shot demonstrations (0-{len(DEMOS)})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    records = runner.select_case_ids(load_mquake(args.data, n=args.n, start=args.start), args.case_ids)
    check_args(args, len(records))
    run = execute(args, records)
    rows = run["rows"]
    summ = summarize_mquake(rows)
    known = summ["breakdown"]["known"]["cases"]
    meta = {
        "benchmark": "mquake",
        "model": args.model,
        "method": args.method,
        "batch": args.batch,
        "hparams": run["hparams_record"],
        "gen_tokens": args.gen_tokens,
        "shots": args.shots,
        "data": str(args.data or "shared mquake_dev.json"),
        "transformer_lens_api": TL_API,
        "model_restored": run["restored"],
        "command": runner.command_line("benchmarks.mquake", argv),
        "cases_known_chain": known,
        "breakdown": summ["breakdown"],
    }
    notes = [
        "×100, mean over cases (ES: over rewrites); ± is a 95% CI half-width; the table shows after editing.",
        "ES: P(target_new) > P(target_true) on each rewrite's cloze, P = exp(-mean token NLL) of the whole "
        "target (CounterFact's efficacy rule).",
        f"Hop / MH: greedy {args.gen_tokens}-token answers, normalised (NFKC, case, punctuation, a/an/the), "
        f"starting with the answer or an alias; MH: any of the questions, {args.shots}-shot prompt.",
        "MH-lik: mean log-prob of new_answer > answer under the question prompts (mean over questions).",
        f"known chains: {known} of {summ['breakdown']['all']['cases']} cases (every single hop right before editing).",
    ]
    summary = runner.write_summary(out_dir=args.out, rows=rows, columns=summ["columns"], column_order=COLUMNS,
                                   meta=meta, requested=len(records), ppl_before=run["ppl_before"], notes=notes)
    detail = breakdown_table(summ["breakdown"])
    md = Path(args.out) / "summary.md"
    atomic_write_text(md, md.read_text() + "\n## Before and after, by subset\n\n" + detail)
    print(runner.markdown_table([summary], COLUMNS))
    print(detail)
    return summary


if __name__ == "__main__":
    main()
