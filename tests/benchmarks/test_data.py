"""Loaders: the hand-written fixtures load, malformed records give clear errors."""

import copy
import json

import pytest

from benchmarks import data
from benchmarks.data import load_counterfact, load_zsre, parse_counterfact_record, parse_zsre_record
from tests.conftest import FIXTURES

CF = FIXTURES / "counterfact_tiny.json"
ZS = FIXTURES / "zsre_tiny.json"


def raw_cf():
    return json.loads(CF.read_text())


def test_load_counterfact_fixture():
    recs = load_counterfact(CF)
    assert [r.case_id for r in recs] == [101, 102, 103]
    r = recs[0]
    assert r.rewrite_prompt == "The Colosseum is located in the city of"
    assert (r.target_new, r.target_true, r.target_new_id) == ("Paris", "Rome", "Q90")
    assert len(r.paraphrase_prompts) == 2 and len(r.neighborhood_prompts) == 3
    assert [x.case_id for x in load_counterfact(CF, n=2, start=1)] == [102, 103]


def test_request_matches_record():
    req = load_counterfact(CF)[1].request()
    assert (req.prompt, req.subject, req.target_new, req.target_true) == (
        "{} plays the sport of", "Michael Jordan", "guitar", "basketball")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r["requested_rewrite"].pop("subject"), r"case_id=101 \(index 0\).*missing field 'subject'"),
        (lambda r: r.pop("neighborhood_prompts"), r"case_id=101 .*missing field 'neighborhood_prompts'"),
        (lambda r: r["requested_rewrite"]["target_new"].pop("str"), r"target_new: missing field 'str'"),
        (lambda r: r["requested_rewrite"].__setitem__("prompt", "no placeholder"), r"no '\{\}' placeholder"),
        (lambda r: r.__setitem__("paraphrase_prompts", []), r"'paraphrase_prompts' is an empty list"),
        (lambda r: r.__setitem__("paraphrase_prompts", ["ok", 3]), r"paraphrase_prompts\[1\] is 3"),
        (lambda r: r.pop("case_id"), r"record at index 0: missing field 'case_id'"),
    ],
)
def test_malformed_counterfact_records(mutate, message):
    rec = copy.deepcopy(raw_cf()[0])
    mutate(rec)
    with pytest.raises(ValueError, match=message):
        parse_counterfact_record(rec, 0)


def test_malformed_record_in_file_names_its_index(tmp_path):
    recs = raw_cf()
    del recs[2]["requested_rewrite"]["target_true"]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(recs))
    with pytest.raises(ValueError, match=r"case_id=103 \(index 2\).*missing field 'target_true'"):
        load_counterfact(path)


def test_duplicate_case_ids_rejected(tmp_path):
    recs = raw_cf()
    recs[1]["case_id"] = 101
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(recs))
    with pytest.raises(ValueError, match="duplicate case_id 101"):
        load_counterfact(path)


def test_not_a_list_and_missing_file(tmp_path):
    path = tmp_path / "cf.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_counterfact(path)
    with pytest.raises(FileNotFoundError):
        load_counterfact(tmp_path / "absent.json")
    with pytest.raises(ValueError, match="n 0"):
        load_counterfact(CF, n=0)


def test_full_counterfact_checked_against_sha(tmp_path):
    fake = tmp_path / "counterfact.json"
    fake.write_text(json.dumps(raw_cf()))
    with pytest.raises(ValueError, match="SHA-256"):
        load_counterfact(fake)
    subset = tmp_path / "subset.json"  # subsets are not checked
    subset.write_text(json.dumps(raw_cf()))
    assert data.check_counterfact_file(subset) is False
    assert len(load_counterfact(subset)) == 3


def test_hf_source_offline_error(monkeypatch):
    import datasets

    def boom(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(ValueError, match="could not be loaded from the Hugging Face Hub.*--data PATH"):
        load_counterfact("hf:azhx/counterfact")


def test_load_zsre_fixture():
    recs = load_zsre(ZS)
    assert [r.case_id for r in recs] == [0, 1, 2]
    r = recs[0]
    assert r.prompt == "In which city is the {} located?"
    assert r.rewrite_prompt == "In which city is the Eiffel Tower located?"
    assert (r.target_new, r.target_true, r.loc_ans) == ("Rome", "Paris", "Steve Jobs")


def test_malformed_zsre_records():
    raw = json.loads(ZS.read_text())
    bad = dict(raw[1])
    del bad["loc_ans"]
    with pytest.raises(ValueError, match="zsre record at index 4: missing field 'loc_ans'"):
        parse_zsre_record(bad, 4)
    bad = dict(raw[0], subject="Louvre")
    with pytest.raises(ValueError, match="subject 'Louvre' not found in src"):
        parse_zsre_record(bad, 0)
    bad = dict(raw[0], answers=[])
    with pytest.raises(ValueError, match="'answers' is an empty list"):
        parse_zsre_record(bad, 0)


def test_default_path_uses_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ROMELENS_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="ROMELENS_DATA"):
        load_counterfact()
    (tmp_path / "counterfact_dev.json").write_text(json.dumps(raw_cf()))
    assert len(load_counterfact(n=1)) == 1
