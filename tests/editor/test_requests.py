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
    assert r.target_new == rec["answers"][0]  # ROME's convention, as the benchmark scores it
    assert r.filled == rec["src"]
    mend = EditRequest.from_zsre(rec, target="alt")
    assert (mend.target_new, mend.target_true) == (rec["alt"], rec["answers"][0])


def test_zsre_one_conversion_for_editor_and_benchmark(shared_data):
    from benchmarks.data import load_zsre

    raw = json.loads((shared_data / "zsre_dev.json").read_text())
    for rec, bench in zip(raw[:20], load_zsre(shared_data / "zsre_dev.json", n=20)):
        assert bench.request() == EditRequest.from_zsre(rec)


def test_zsre_target_conventions():
    rec = {"src": "What team does X play for?", "subject": "X", "alt": "Ajax", "answers": ["PSV"], "pred": "PSV"}
    assert EditRequest.from_zsre(rec) == EditRequest(prompt="What team does {} play for?", subject="X", target_new="PSV")
    assert EditRequest.from_zsre({**rec, "pred": "Feyenoord"}).target_true == "Feyenoord"
    assert EditRequest.from_zsre(rec, target="alt").target_new == "Ajax"
    with pytest.raises(EditRequestError, match="target 'new'"):
        EditRequest.from_zsre(rec, target="new")
    with pytest.raises(EditRequestError, match="zsRE record"):
        EditRequest.from_zsre({"src": "x", "subject": "x", "answers": []})


def test_bad_records():
    with pytest.raises(EditRequestError, match="CounterFact"):
        EditRequest.from_counterfact({"foo": 1})
    with pytest.raises(EditRequestError, match="not found"):
        EditRequest.from_zsre({"src": "Where is X?", "subject": "Y", "alt": "Z", "answers": ["W"]})
    with pytest.raises(EditRequestError, match="empty"):
        as_requests([])
