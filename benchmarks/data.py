"""Loaders for CounterFact / MultiCounterFact and zsRE, with record validation.

Data files are never part of the project. A loader takes a path; with none it looks in
`$ROMELENS_DATA` and then in `../shared/data` beside the repository. A CounterFact source
that starts with `hf:` (e.g. `hf:azhx/counterfact`) is loaded with `datasets.load_dataset`,
which needs the Hugging Face Hub.

Example:
    >>> from benchmarks.data import load_counterfact
    >>> records = load_counterfact(n=3)            # ../shared/data/counterfact_dev.json
    >>> records[0].subject, records[0].target_new, records[0].target_true
    ('Danielle Darrieux', 'English', 'French')
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

COUNTERFACT_SHA256 = "d017056125178a13728594e66a801357a8db9ed7973a7425554bb4271de9fc6f"
"""SHA-256 of the full published `counterfact.json` (21,919 records)."""
COUNTERFACT_SIZE = 45_108_470
"""Size in bytes of the full published `counterfact.json`."""

DEFAULT_COUNTERFACT = "counterfact_dev.json"
DEFAULT_ZSRE = "zsre_dev.json"
DEFAULT_WIKITEXT = "wikitext-2-raw-test.txt"


def data_dir() -> Path:
    """`$ROMELENS_DATA` if set, else `../shared/data` beside the repository."""
    env = os.environ.get("ROMELENS_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def default_path(name: str) -> Path:
    """Path of a shared data file in `data_dir()`.

    Args:
        name: the file name, e.g. `"counterfact_dev.json"`.

    Returns:
        `data_dir() / name`, which exists.

    Raises:
        FileNotFoundError: the file is not there; the message names the place looked in and
            how to pass a path instead.

    Example:
        >>> default_path("counterfact_dev.json")
    """
    path = data_dir() / name
    if not path.exists():
        raise FileNotFoundError(
            f"data file {name!r} not found at {path}; pass a path (--data PATH) or set ROMELENS_DATA "
            "to the folder holding it"
        )
    return path


@dataclass(frozen=True, kw_only=True)
class CounterFactRecord:
    """One CounterFact rewrite with its evaluation prompts.

    Attributes:
        case_id: the record's id in CounterFact.
        prompt: rewrite template with a `{}` placeholder for the subject.
        subject: the subject string.
        relation_id: Wikidata relation, e.g. "P103".
        target_new: the counterfactual object (no leading space).
        target_true: the true object (no leading space).
        target_new_id: Wikidata id of `target_new` (keys ROME's attribute snippets).
        target_true_id: Wikidata id of `target_true`.
        paraphrase_prompts: filled prompts that paraphrase the rewrite (PS/PM).
        neighborhood_prompts: filled prompts about other subjects with the same true object (NS/NM).
        attribute_prompts: filled prompts about other subjects that have `target_new` (RS fallback).
        generation_prompts: filled prompts for free generation (GE, RS).
    """

    case_id: int
    prompt: str
    subject: str
    relation_id: str
    target_new: str
    target_true: str
    target_new_id: str
    target_true_id: str
    paraphrase_prompts: tuple[str, ...]
    neighborhood_prompts: tuple[str, ...]
    attribute_prompts: tuple[str, ...]
    generation_prompts: tuple[str, ...]

    @property
    def rewrite_prompt(self) -> str:
        """The rewrite prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject, 1)

    def request(self):
        """This record as an `editor.EditRequest` (imported lazily)."""
        from editor.requests import EditRequest  # noqa: PLC0415

        return EditRequest(
            prompt=self.prompt, subject=self.subject, target_new=self.target_new, target_true=self.target_true
        )


@dataclass(frozen=True, kw_only=True)
class ZsreRecord:
    """One zsRE edit (ROME/MEND format), prepared as ROME evaluates it.

    Attributes:
        case_id: position of the record in its file.
        prompt: the question `src` with the subject replaced by `{}`.
        subject: the subject string.
        target_new: the edit target, `answers[0]` (as ROME's `MENDQADataset` uses it).
        target_true: the model's recorded prediction `pred` (used only as the request's true object).
        rephrase: a paraphrased question (paraphrase accuracy).
        loc: an unrelated Natural Questions prompt (specificity); evaluated as `loc + "?"`.
        loc_ans: the answer to `loc`.
    """

    case_id: int
    prompt: str
    subject: str
    target_new: str
    target_true: str
    rephrase: str
    loc: str
    loc_ans: str

    @property
    def rewrite_prompt(self) -> str:
        """The question with the subject filled in (efficacy is scored on it)."""
        return self.prompt.replace("{}", self.subject, 1)

    def request(self):
        """This record as an `editor.EditRequest` (imported lazily)."""
        from editor.requests import EditRequest  # noqa: PLC0415

        same = self.target_true.strip() == self.target_new.strip()
        return EditRequest(
            prompt=self.prompt,
            subject=self.subject,
            target_new=self.target_new,
            target_true=None if same else self.target_true,
        )


def _need(raw: Any, key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    if key not in raw:
        raise ValueError(f"{where}: missing field {key!r}")
    val = raw[key]
    if not isinstance(val, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"{where}: field {key!r} is {type(val).__name__}, expected {names}")
    if isinstance(val, str) and not val.strip():
        raise ValueError(f"{where}: field {key!r} is empty")
    return val


def _str_list(raw: dict, key: str, where: str, *, allow_empty: bool = False) -> tuple[str, ...]:
    vals = _need(raw, key, where, list)
    if not vals and not allow_empty:
        raise ValueError(f"{where}: field {key!r} is an empty list")
    for i, v in enumerate(vals):
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"{where}: {key}[{i}] is {v!r}, expected a non-empty string")
    return tuple(vals)


def parse_counterfact_record(raw: Any, index: int = 0) -> CounterFactRecord:
    """Validate one raw CounterFact record and return a `CounterFactRecord`.

    Args:
        raw: one record as read from the JSON (a dict with `case_id`, `requested_rewrite`,
            the prompt lists).
        index: its position in the file, for messages.

    Returns:
        The validated `CounterFactRecord` (targets without leading space, prompts as tuples).

    Raises:
        ValueError: naming the record (case_id, or its index) and the missing or bad field
            (also a prompt without a `{}` placeholder).

    Example:
        >>> parse_counterfact_record({"case_id": 7})
        Traceback (most recent call last):
        ValueError: counterfact record case_id=7 (index 0): missing field 'requested_rewrite'
    """
    case_id = raw.get("case_id") if isinstance(raw, dict) else None
    where = f"counterfact record case_id={case_id} (index {index})" if case_id is not None else (
        f"counterfact record at index {index}"
    )
    case_id = _need(raw, "case_id", where, int)
    rw = _need(raw, "requested_rewrite", where, dict)
    rwhere = f"{where}.requested_rewrite"
    prompt = _need(rw, "prompt", rwhere, str)
    if "{}" not in prompt:
        raise ValueError(f"{rwhere}: prompt {prompt!r} has no '{{}}' placeholder for the subject")
    subject = _need(rw, "subject", rwhere, str)
    targets = {}
    for key in ("target_new", "target_true"):
        t = _need(rw, key, rwhere, dict)
        targets[key] = (_need(t, "str", f"{rwhere}.{key}", str), str(t.get("id", "")))
    return CounterFactRecord(
        case_id=case_id,
        prompt=prompt,
        subject=subject,
        relation_id=str(rw.get("relation_id", "")),
        target_new=targets["target_new"][0],
        target_true=targets["target_true"][0],
        target_new_id=targets["target_new"][1],
        target_true_id=targets["target_true"][1],
        paraphrase_prompts=_str_list(raw, "paraphrase_prompts", where),
        neighborhood_prompts=_str_list(raw, "neighborhood_prompts", where),
        attribute_prompts=_str_list(raw, "attribute_prompts", where, allow_empty=True),
        generation_prompts=_str_list(raw, "generation_prompts", where, allow_empty=True),
    )


def parse_zsre_record(raw: Any, index: int = 0) -> ZsreRecord:
    """Validate one raw zsRE record (ROME/MEND format) and return a `ZsreRecord`.

    Args:
        raw: one record as read from the JSON (`subject`, `src`, `answers`, `rephrase`,
            `loc`, `loc_ans`).
        index: its position in the file; becomes `case_id`.

    Returns:
        The validated `ZsreRecord`.

    Raises:
        ValueError: naming the record index and the missing or bad field (also a subject
            not found in `src`, or a record `editor.EditRequest.from_zsre` refuses).
    """
    where = f"zsre record at index {index}"
    subject = _need(raw, "subject", where, str)
    src = _need(raw, "src", where, str)
    if subject not in src:
        raise ValueError(f"{where}: subject {subject!r} not found in src {src!r}")
    answers = _str_list(raw, "answers", where)
    rephrase = _need(raw, "rephrase", where, str)
    loc = _need(raw, "loc", where, str)
    loc_ans = _need(raw, "loc_ans", where, str)
    from editor.requests import EditRequest, EditRequestError  # noqa: PLC0415  (the one zsRE conversion)

    try:
        req = EditRequest.from_zsre(raw)  # ROME's convention: target_new = answers[0]
    except EditRequestError as err:
        raise ValueError(f"{where}: {err}") from None
    return ZsreRecord(
        case_id=index,
        prompt=req.prompt,
        subject=req.subject,
        target_new=req.target_new,
        target_true=req.target_true or req.target_new,
        rephrase=rephrase,
        loc=loc,
        loc_ans=loc_ans,
    )


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, as 64 hex digits (read 1 MiB at a time).

    Raises:
        OSError: the file cannot be read (e.g. `FileNotFoundError`).
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_counterfact_file(path: str | os.PathLike) -> bool:
    """Check a full `counterfact.json` against the published SHA-256.

    Only a file named `counterfact.json` or exactly `COUNTERFACT_SIZE` bytes long is checked
    (subsets such as the dev file are not). Returns True when a check was done and passed.

    Raises:
        ValueError: the file claims to be the full CounterFact and its hash differs.
        OSError: the file cannot be read.
    """
    path = Path(path)
    size = path.stat().st_size
    if path.name != "counterfact.json" and size != COUNTERFACT_SIZE:
        return False
    digest = sha256_file(path)
    if digest != COUNTERFACT_SHA256:
        raise ValueError(
            f"data {str(path)!r} looks like the full CounterFact ({size} bytes) but its SHA-256 is "
            f"{digest}, expected {COUNTERFACT_SHA256}; the file is corrupt or a different version"
        )
    log.info("%s matches the published CounterFact SHA-256", path)
    return True


def _data_path(source: str | os.PathLike | None, default: str) -> Path:
    """`source` as a path, or the shared data file `default`; refused when it does not exist."""
    path = Path(source) if source is not None else default_path(default)
    if not path.exists():
        raise FileNotFoundError(f"data {str(path)!r} does not exist")
    return path


def _refuse_repeated_ids(records: list, lo: int, where) -> None:
    """Raise `ValueError(where(index, case_id))` at the first `case_id` seen twice."""
    seen: set[int] = set()
    for i, r in enumerate(records, start=lo):
        if r.case_id in seen:
            raise ValueError(where(i, r.case_id))
        seen.add(r.case_id)


def _read_json_list(path: Path) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"data {str(path)!r} is not valid JSON: {err}") from err
    if not isinstance(raw, list):
        raise ValueError(f"data {str(path)!r} holds a {type(raw).__name__}, expected a JSON list of records")
    return raw


def _load_hf(name: str) -> list[dict]:
    try:
        import datasets  # noqa: PLC0415
    except ImportError as err:  # pragma: no cover - datasets is a dependency
        raise ValueError(f"data 'hf:{name}' needs the `datasets` package") from err
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as err:
        raise ValueError(
            f"data 'hf:{name}' could not be loaded from the Hugging Face Hub ({type(err).__name__}: {err}). "
            "Offline, pass a local JSON file with --data PATH."
        ) from err
    return [dict(r) for r in ds]


def _slice(n: int | None, start: int) -> tuple[int, int | None]:
    if n is not None and n < 1:
        raise ValueError(f"n {n} must be >= 1 (or None for all records)")
    if start < 0:
        raise ValueError(f"start {start} must be >= 0")
    return start, None if n is None else start + n


def load_counterfact(
    source: str | os.PathLike | None = None, *, n: int | None = None, start: int = 0
) -> list[CounterFactRecord]:
    """Load and validate CounterFact (or MultiCounterFact) records.

    Args:
        source: a JSON file, `hf:<dataset name>` for the Hugging Face Hub, or None for
            `counterfact_dev.json` in the shared data folder.
        n: keep only this many records (after `start`); None keeps all.
        start: index of the first record kept.

    Returns:
        A list of `CounterFactRecord`, in file order.

    Raises:
        ValueError: `n` < 1 or `start` < 0; a file that is not a JSON list of records, a
            record with a missing or bad field (`parse_counterfact_record`) or a repeated
            `case_id`; a full `counterfact.json` whose SHA-256 differs from the published one
            (`check_counterfact_file`); an `hf:` source that cannot be loaded.
        FileNotFoundError: `source` does not exist, or with None, no `counterfact_dev.json`
            in the shared data folder (`default_path`).

    Example:
        >>> load_counterfact("../shared/data/counterfact_dev.json", n=2)[1].case_id
        1
    """
    lo, hi = _slice(n, start)
    if isinstance(source, str) and source.startswith("hf:"):
        raw = _load_hf(source[3:])
    else:
        path = _data_path(source, DEFAULT_COUNTERFACT)
        check_counterfact_file(path)
        raw = _read_json_list(path)
    records = [parse_counterfact_record(r, i) for i, r in enumerate(raw[lo:hi], start=lo)]
    _refuse_repeated_ids(records, lo, lambda i, cid: f"counterfact record at index {i}: duplicate case_id {cid}")
    return records


def load_zsre(source: str | os.PathLike | None = None, *, n: int | None = None, start: int = 0) -> list[ZsreRecord]:
    """Load and validate zsRE records (ROME/MEND `zsre_mend_eval.json` format).

    Args:
        source: a JSON file, or None for `zsre_dev.json` in the shared data folder.
        n: keep only this many records (after `start`); None keeps all.
        start: index of the first record kept.

    Returns:
        A list of `ZsreRecord`; `case_id` is the record's index in the file.

    Raises:
        ValueError: `n` < 1 or `start` < 0, a file that is not a JSON list of records, or a
            record with a missing or bad field (`parse_zsre_record`).
        FileNotFoundError: `source` does not exist, or with None, no `zsre_dev.json` in the
            shared data folder (`default_path`).

    Example:
        >>> load_zsre(n=1)[0].subject
        'Watts Humphrey'
    """
    lo, hi = _slice(n, start)
    raw = _read_json_list(_data_path(source, DEFAULT_ZSRE))
    return [parse_zsre_record(r, i) for i, r in enumerate(raw[lo:hi], start=lo)]


def load_text(path: str | os.PathLike | None = None) -> str:
    """Text of the WikiText-2 raw test split (or any text file), decoded as UTF-8.

    Args:
        path: a text file; None for `wikitext-2-raw-test.txt` in the shared data folder.

    Returns:
        The whole text.

    Raises:
        FileNotFoundError: with None, no WikiText file in the shared data folder
            (`default_path`); otherwise `path` does not exist.
    """
    path = Path(path) if path is not None else default_path(DEFAULT_WIKITEXT)
    return Path(path).read_text(encoding="utf-8")


def records_by_id(records: Sequence[CounterFactRecord | ZsreRecord]) -> dict[int, Any]:
    """`{case_id: record}`; for a repeated `case_id` the last record wins.

    Example:
        >>> records_by_id(load_counterfact(n=2))[1].case_id
        1
    """
    return {r.case_id: r for r in records}


# --------------------------------------------------------------------------- MQuAKE

DEFAULT_MQUAKE = "mquake_dev.json"


@dataclass(frozen=True, kw_only=True)
class MquakeRewrite:
    """One requested rewrite of an MQuAKE case (CounterFact style).

    Attributes:
        prompt: template with exactly one `{}` for the subject, e.g. `"{} is a citizen of"`.
        subject: the subject string.
        target_new: the new object (no leading space).
        target_true: the object before editing (no leading space).
        relation_id: Wikidata relation, e.g. "P27".
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str
    relation_id: str = ""

    @property
    def cloze(self) -> str:
        """The prompt with the subject filled in (edit-wise success is scored on it)."""
        return self.prompt.replace("{}", self.subject, 1)

    def request(self):
        """This rewrite as an `editor.EditRequest` (imported lazily)."""
        from editor.requests import EditRequest  # noqa: PLC0415

        return EditRequest(prompt=self.prompt, subject=self.subject, target_new=self.target_new,
                           target_true=self.target_true)


@dataclass(frozen=True, kw_only=True)
class MquakeHop:
    """One hop of an MQuAKE chain.

    Attributes:
        question: the hop as a question.
        cloze: the hop as a cloze prompt, e.g. `"Ellie Kemper is a citizen of"`.
        answer: the hop's answer.
        aliases: other accepted answers (possibly none).
    """

    question: str
    cloze: str
    answer: str
    aliases: tuple[str, ...] = ()

    @property
    def answers(self) -> tuple[str, ...]:
        """`answer` then the aliases."""
        return (self.answer, *self.aliases)


@dataclass(frozen=True, kw_only=True)
class MquakeRecord:
    """One MQuAKE case (Zhong et al. 2023): edits, multi-hop questions and the chains.

    Attributes:
        case_id: the case's id in MQuAKE.
        rewrites: the requested rewrites (1-4), applied together for this case.
        questions: the paraphrased multi-hop questions (3 in MQuAKE).
        answer: the multi-hop answer before editing.
        answer_alias: its aliases.
        new_answer: the multi-hop answer after editing.
        new_answer_alias: its aliases.
        single_hops: the chain before editing.
        new_single_hops: the chain after editing (2-4 hops).
    """

    case_id: int
    rewrites: tuple[MquakeRewrite, ...]
    questions: tuple[str, ...]
    answer: str
    answer_alias: tuple[str, ...]
    new_answer: str
    new_answer_alias: tuple[str, ...]
    single_hops: tuple[MquakeHop, ...]
    new_single_hops: tuple[MquakeHop, ...]

    @property
    def n_hops(self) -> int:
        """The number of hops of the edited chain (2, 3 or 4 in MQuAKE)."""
        return len(self.new_single_hops)

    @property
    def answers(self) -> tuple[str, ...]:
        """`answer` then its aliases (accepted before editing)."""
        return (self.answer, *self.answer_alias)

    @property
    def new_answers(self) -> tuple[str, ...]:
        """`new_answer` then its aliases (accepted after editing)."""
        return (self.new_answer, *self.new_answer_alias)

    def requests(self) -> tuple:
        """The case's `editor.EditRequest`s, one per requested rewrite, in order."""
        return tuple(rw.request() for rw in self.rewrites)

    def request(self) -> tuple:
        """What the shared runner asks each record for: here all of `requests()`.

        `benchmarks.runner.requests_of` flattens these tuples before they reach the editor,
        so one case's rewrites are edited together (and K cases' with `--batch K`).
        """
        return self.requests()


def _hops(raw: dict, key: str, where: str) -> tuple[MquakeHop, ...]:
    items = _need(raw, key, where, list)
    if not items:
        raise ValueError(f"{where}: field {key!r} is an empty list; expected at least one hop")
    out = []
    for i, h in enumerate(items):
        hw = f"{where}.{key}[{i}]"
        out.append(MquakeHop(question=_need(h, "question", hw, str), cloze=_need(h, "cloze", hw, str),
                             answer=_need(h, "answer", hw, str),
                             aliases=_str_list(h, "answer_alias", hw, allow_empty=True)))
    return tuple(out)


def parse_mquake_record(raw: Any, index: int = 0) -> MquakeRecord:
    """Validate one raw MQuAKE case and return an `MquakeRecord`.

    Args:
        raw: one case as read from the JSON (`case_id`, `requested_rewrite`, `questions`,
            `answer`, `answer_alias`, `new_answer`, `new_answer_alias`, `single_hops`,
            `new_single_hops`).
        index: its position in the file, for messages.

    Returns:
        The validated `MquakeRecord`.

    Raises:
        ValueError: naming the case (case_id, or its index) and the bad field: a rewrite
            prompt without exactly one `{}`, an empty `requested_rewrite`, `questions`,
            `single_hops` or `new_single_hops`, an alias list that is not a list of
            non-empty strings, chains of different lengths, or a missing field.

    Example:
        >>> parse_mquake_record({"case_id": 7})
        Traceback (most recent call last):
        ValueError: mquake case case_id=7 (index 0): missing field 'requested_rewrite'
    """
    case_id = raw.get("case_id") if isinstance(raw, dict) else None
    where = f"mquake case case_id={case_id} (index {index})" if case_id is not None else f"mquake case at index {index}"
    case_id = _need(raw, "case_id", where, int)
    rws = _need(raw, "requested_rewrite", where, list)
    if not rws:
        raise ValueError(f"{where}: field 'requested_rewrite' is an empty list; expected at least one rewrite")
    rewrites = []
    for i, rw in enumerate(rws):
        rwhere = f"{where}.requested_rewrite[{i}]"
        prompt = _need(rw, "prompt", rwhere, str)
        if prompt.count("{}") != 1:
            raise ValueError(f"{rwhere}: prompt {prompt!r} has {prompt.count('{}')} '{{}}' placeholders, expected exactly one")
        targets = [_need(_need(rw, key, rwhere, dict), "str", f"{rwhere}.{key}", str) for key in ("target_new", "target_true")]
        if targets[0].strip() == targets[1].strip():
            raise ValueError(f"{rwhere}: target_new {targets[0]!r} equals target_true; nothing to edit")
        rewrites.append(MquakeRewrite(prompt=prompt, subject=_need(rw, "subject", rwhere, str), target_new=targets[0],
                                      target_true=targets[1], relation_id=str(rw.get("relation_id", ""))))
    single, new = _hops(raw, "single_hops", where), _hops(raw, "new_single_hops", where)
    if len(single) != len(new):
        raise ValueError(f"{where}: single_hops has {len(single)} hops but new_single_hops has {len(new)}")
    return MquakeRecord(
        case_id=case_id,
        rewrites=tuple(rewrites),
        questions=_str_list(raw, "questions", where),
        answer=_need(raw, "answer", where, str),
        answer_alias=_str_list(raw, "answer_alias", where, allow_empty=True),
        new_answer=_need(raw, "new_answer", where, str),
        new_answer_alias=_str_list(raw, "new_answer_alias", where, allow_empty=True),
        single_hops=single,
        new_single_hops=new,
    )


def load_mquake(path: str | os.PathLike | None = None, *, n: int | None = None, start: int = 0) -> list[MquakeRecord]:
    """Load and validate MQuAKE cases (the MQuAKE-CF-3k / MQuAKE-2002 JSON format).

    Every case of the slice is validated before any is returned, so a bad case stops a
    benchmark before anything is run or written.

    Args:
        path: a JSON file, or None for `mquake_dev.json` in the shared data folder.
        n: keep only this many cases (after `start`); None keeps all.
        start: index of the first case kept.

    Returns:
        A list of `MquakeRecord`, in file order.

    Raises:
        ValueError: `n` < 1 or `start` < 0, a file that is not a JSON list, a case with a
            missing or bad field (`parse_mquake_record`, naming the case_id) or a repeated
            `case_id`.
        FileNotFoundError: `path` does not exist, or with None, no `mquake_dev.json` in the
            shared data folder (`default_path`).

    Example:
        >>> load_mquake(n=1)[0].new_answer
        'Kolinda Grabar-Kitarović'
    """
    lo, hi = _slice(n, start)
    raw = _read_json_list(_data_path(path, DEFAULT_MQUAKE))
    records = [parse_mquake_record(r, i) for i, r in enumerate(raw[lo:hi], start=lo)]
    _refuse_repeated_ids(records, lo, lambda i, cid: f"mquake case case_id={cid} (index {i}): duplicate case_id")
    return records
