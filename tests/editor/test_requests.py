"""EditRequest validation and dataset loaders."""

import json

import pytest

from editor.requests import EditRequest, EditRequestError, as_requests


def test_valid_request_fills_prompt():
    r = EditRequest(prompt="{} is located in the city of", subject="Eiffel Tower", target_new="Rome", target_true="Paris")
    assert r.filled == "Eiffel Tower is located in the city of"


@pytest.mark.parametrize(
    "kw, word",
    [
        (dict(prompt="Eiffel Tower is in", subject="Eiffel Tower", target_new="Rome"), "prompt"),
        (dict(prompt="{} and {} are in", subject="X", target_new="Rome"), "prompt"),
        (dict(prompt="{} is in", subject="  ", target_new="Rome"), "subject"),
        (dict(prompt="{} is in", subject="X", target_new=""), "target_new"),
        (dict(prompt="{} is in", subject="X", target_new="Rome", target_true="Rome"), "target_true"),
    ],
)
def test_bad_requests_name_the_field(kw, word):
    with pytest.raises(EditRequestError, match=word):
        EditRequest(**kw)
    assert issubclass(EditRequestError, ValueError)


def test_counterfact_loader(shared_data):
    rec = json.loads((shared_data / "counterfact_dev.json").read_text())[0]
    r = EditRequest.from_counterfact(rec)
    rw = rec["requested_rewrite"]
    assert (r.prompt, r.subject, r.target_new, r.target_true) == (
        rw["prompt"], rw["subject"], rw["target_new"]["str"], rw["target_true"]["str"]
    )
    assert as_requests([rec])[0] == r


def test_zsre_loader(shared_data):
    recs = json.loads((shared_data / "zsre_dev.json").read_text())
    rec = next(x for x in recs if x["subject"] in x["src"])
    r = EditRequest.from_zsre(rec)
    assert r.prompt == rec["src"].replace(rec["subject"], "{}", 1)
    assert r.target_new == rec["alt"]
    assert r.filled == rec["src"]


def test_bad_records():
    with pytest.raises(EditRequestError, match="CounterFact"):
        EditRequest.from_counterfact({"foo": 1})
    with pytest.raises(EditRequestError, match="not found"):
        EditRequest.from_zsre({"src": "Where is X?", "subject": "Y", "alt": "Z", "answers": ["W"]})
    with pytest.raises(EditRequestError, match="empty"):
        as_requests([])
