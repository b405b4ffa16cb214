"""Edit requests: what to rewrite, and loaders from CounterFact and zsRE records.

Example:
    >>> from editor.requests import EditRequest
    >>> r = EditRequest(prompt="{} is located in the city of", subject="Eiffel Tower", target_new="Rome")
    >>> r.filled
    'Eiffel Tower is located in the city of'
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping


class EditRequestError(ValueError):
    """An edit request is malformed; the message names the field and its value."""


@dataclass(frozen=True, kw_only=True)
class EditRequest:
    """One factual rewrite: make `prompt` with `subject` filled in continue with `target_new`.

    Attributes:
        prompt: a template with exactly one `{}` where the subject goes, e.g.
            `"{} is located in the city of"`.
        subject: the subject string, e.g. `"Eiffel Tower"`.
        target_new: the new object, e.g. `"Rome"` (no leading space needed).
        target_true: the current object, e.g. `"Paris"`, or None when unknown. Only
            used for diagnostics.

    Raises:
        EditRequestError: (a `ValueError`) a prompt without exactly one `{}`, an empty
            subject, target_new or target_true, or target_true equal to target_new.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    def __post_init__(self):
        if not isinstance(self.prompt, str) or self.prompt.count("{}") != 1:
            raise EditRequestError(
                f"prompt {self.prompt!r} must be a string with exactly one '{{}}' placeholder for the subject"
            )
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise EditRequestError(f"subject {self.subject!r} is empty; expected a non-empty string")
        if not isinstance(self.target_new, str) or not self.target_new.strip():
            raise EditRequestError(f"target_new {self.target_new!r} is empty; expected a non-empty string")
        if self.target_true is not None:
            if not isinstance(self.target_true, str) or not self.target_true.strip():
                raise EditRequestError(f"target_true {self.target_true!r} is empty; expected a string or None")
            if self.target_true.strip() == self.target_new.strip():
                raise EditRequestError(
                    f"target_new {self.target_new!r} equals target_true {self.target_true!r}; nothing to edit"
                )

    @property
    def filled(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)

    def to_dict(self) -> dict[str, Any]:
        """The four fields as a dict; `from_dict` inverts it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EditRequest":
        """The request from a dict with its fields (missing ones are None).

        Raises:
            EditRequestError: the fields fail the checks of `EditRequest`.
        """
        return cls(**{k: d.get(k) for k in ("prompt", "subject", "target_new", "target_true")})

    @classmethod
    def from_counterfact(cls, record: Mapping[str, Any]) -> "EditRequest":
        """Build a request from a CounterFact record (`requested_rewrite` field).

        Raises:
            EditRequestError: the record has no `requested_rewrite` with prompt, subject,
                `target_new.str` and `target_true.str`, or they fail `EditRequest`'s checks.

        Example:
            >>> EditRequest.from_counterfact({"requested_rewrite": {"prompt": "{} plays",
            ...     "subject": "Jordan", "target_new": {"str": "tennis"}, "target_true": {"str": "basketball"}}})
        """
        try:
            rw = record["requested_rewrite"]
            return cls(
                prompt=rw["prompt"],
                subject=rw["subject"],
                target_new=rw["target_new"]["str"],
                target_true=rw["target_true"]["str"],
            )
        except (KeyError, TypeError) as err:
            raise EditRequestError(
                f"record {str(record)[:80]!r} is not a CounterFact record (missing {err})"
            ) from None

    @classmethod
    def from_zsre(cls, record: Mapping[str, Any], *, target: str = "answers") -> "EditRequest":
        """Build a request from a zsRE record (ROME/MEND format).

        The prompt is `src` with the subject replaced by `{}`. Two conventions exist for the
        new target, and this is the one place that converts (the zsRE benchmark uses it):

        - `target="answers"` (default, ROME's `MENDQADataset` and its zsRE table, which our
          benchmark reproduces): `target_new = answers[0]`, `target_true = pred` (the
          prediction recorded with the data; None when missing or equal);
        - `target="alt"` (MEND's convention, the edit towards an alternative answer):
          `target_new = alt`, `target_true = answers[0]` (None when equal).

        Raises:
            EditRequestError: for a record without the fields, a subject missing from
                `src`, an unknown `target`, or fields that fail `EditRequest`'s checks.
        """
        if target not in ("answers", "alt"):
            raise EditRequestError(f"target {target!r} must be 'answers' (ROME) or 'alt' (MEND)")
        try:
            src, subject = record["src"], record["subject"]
            answers = record["answers"]
            new = answers[0] if target == "answers" else record["alt"]
        except (KeyError, TypeError, IndexError) as err:
            raise EditRequestError(f"record {str(record)[:80]!r} is not a zsRE record (missing {err})") from None
        if not isinstance(src, str) or not isinstance(subject, str) or subject not in src:
            raise EditRequestError(f"subject {subject!r} not found in zsRE src {src!r}")
        true = record.get("pred") if target == "answers" else answers[0]
        if not isinstance(true, str) or not true.strip() or not isinstance(new, str) or true.strip() == new.strip():
            true = None
        return cls(prompt=src.replace(subject, "{}", 1), subject=subject, target_new=new, target_true=true)


def as_requests(requests) -> list[EditRequest]:
    """Normalise one request, a dict, or a list of them to a list of `EditRequest`.

    A dict with `requested_rewrite` is read as a CounterFact record (`from_counterfact`),
    any other dict by `from_dict`.

    Returns:
        A non-empty list of `EditRequest`.

    Raises:
        EditRequestError: (a `ValueError`) an item that is neither an `EditRequest` nor a
            dict, a malformed one, or no request at all.
    """
    if isinstance(requests, (EditRequest, Mapping)):
        requests = [requests]
    out = []
    for r in requests:
        if isinstance(r, EditRequest):
            out.append(r)
        elif isinstance(r, Mapping) and "requested_rewrite" in r:
            out.append(EditRequest.from_counterfact(r))
        elif isinstance(r, Mapping):
            out.append(EditRequest.from_dict(r))
        else:
            raise EditRequestError(f"request {r!r} is not an EditRequest or a dict")
    if not out:
        raise EditRequestError("requests [] is empty; expected at least one EditRequest")
    return out
