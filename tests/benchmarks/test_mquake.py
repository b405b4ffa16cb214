"""MQuAKE: answer matching, loader checks, metric arithmetic, known chains, runs and resume on the tiny model."""

import json

import pytest
import torch

import tracer
from benchmarks import metrics, mquake, runner
from benchmarks.data import load_mquake
from benchmarks.mquake import MquakeEval, matches, normalize_answer, question_prompt, summarize_mquake
from tests.benchmarks.fakes import RankOneMethod
from tests.conftest import FIXTURES

DATA = FIXTURES / "mquake_tiny.json"


@pytest.fixture
def records():
    return load_mquake(DATA)


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize("text, expected", [
    ("The United States", "united states"),            # article, case
    ("an apple a day", "apple day"),                   # articles as words only
    ("Theresa May", "theresa may"),                    # 'the' inside a word stays
    ("U.S.A.!", "usa"),                                # punctuation deleted
    ("Grabar-Kitarović", "grabarkitarović"),           # hyphen deleted, diacritic kept
    ("Ｃｒｏａｔｉａ", "croatia"),                         # full-width letters (NFKC)
    ("Kitarovic\u0301", "kitarović"),                  # combining accent composed (NFKC)
    ("  Paris\u00a0\n France ", "paris france"),       # unicode whitespace collapsed
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_matches_prefix_alias_and_boundaries():
    assert matches(" the United States, and", ["United States of America", "United States"])
    assert matches(" THE U.S.A. is", ["USA"])
    assert matches(" Grabar-Kitarović.", ["Kolinda Grabar-Kitarović", "Grabar-Kitarović"])
    assert not matches(" Croatian wine", ["Croatia"])          # whole words only
    assert not matches(" in Croatia", ["Croatia"])             # the answer must come first
    assert not matches(" anything", ["The"])                   # an alias that normalises to '' matches nothing
    assert matches("Croatia", ["croatia"])                     # the whole text


def test_question_prompt():
    p = question_prompt("Who?", shots=2)
    assert p.startswith("Q: " + mquake.DEMOS[0][0]) and p.endswith("Q: Who?\nA:") and p.count("Q:") == 3


def test_demos_are_not_mquake_cases(shared_data):
    cases = load_mquake(shared_data / "mquake_dev.json")
    demos = {normalize_answer(q) for q, _ in mquake.DEMOS}
    assert not demos & {normalize_answer(q) for r in cases for q in r.questions}
    assert not {q for q, _ in mquake.DEMOS} & {h.question for r in cases for h in r.single_hops}


# --------------------------------------------------------------------------- loader


def test_load_mquake_fixture(records):
    assert [r.case_id for r in records] == [11, 12, 13, 14]
    assert [r.n_hops for r in records] == [2, 3, 2, 3]
    reqs = records[1].requests()
    assert [q.subject for q in reqs] == ["Michael Jordan", "Toko Yasuda"]
    assert reqs[1].prompt == "The mother tongue of {} is" and reqs[1].target_new == "French"
    assert records[1].request() == reqs
    assert records[0].rewrites[0].cloze == "The Louvre is located in the city of"
    assert records[0].new_answers == ("Italy", "Italian Republic")


def _bad(tmp_path, change):
    raw = json.loads(DATA.read_text())
    change(raw[2])  # case_id 13
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    return path


BAD = {
    "no placeholder": (lambda c: c["requested_rewrite"][0].update(prompt="Apple was founded by"), "placeholder"),
    "two placeholders": (lambda c: c["requested_rewrite"][0].update(prompt="{} was founded by {}"), "placeholder"),
    "empty new_single_hops": (lambda c: c.update(new_single_hops=[]), "new_single_hops"),
    "alias not a list": (lambda c: c.update(new_answer_alias="Jordan"), "new_answer_alias"),
    "alias not strings": (lambda c: c["single_hops"][0].update(answer_alias=["Jobs", 3]), "answer_alias"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_case_names_case(tmp_path, name):
    change, field = BAD[name]
    with pytest.raises(ValueError, match=rf"case_id=13 .*{field}"):
        load_mquake(_bad(tmp_path, change))


def test_bad_case_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(tracer, "load_model", lambda *a, **k: pytest.fail("model loaded for bad data"))
    out = tmp_path / "run"
    path = _bad(tmp_path, BAD["empty new_single_hops"][0])
    with pytest.raises(ValueError, match="case_id=13"):
        mquake.main(["--out", str(out), "--data", str(path), "--ppl-tokens", "0"])
    assert not out.exists()


def test_batch_larger_than_cases(tmp_path, monkeypatch):
    monkeypatch.setattr(tracer, "load_model", lambda *a, **k: pytest.fail("model loaded for a bad --batch"))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="--batch 5 .*number of cases \\(4\\)"):
        mquake.main(["--method", "memit", "--batch", "5", "--out", str(out), "--data", str(DATA), "--ppl-tokens", "0"])
    assert not out.exists()


# --------------------------------------------------------------------------- metric arithmetic


def _fake_model_calls(monkeypatch, texts, nll):
    """Greedy continuations by prompt (default ' nothing') and target NLLs by (prompt, target)."""
    calls = []

    def gen(model, prompts, max_new_tokens):
        calls.extend(prompts)
        return [texts.get(p, " nothing") for p in prompts]

    monkeypatch.setattr(mquake, "generate_continuations", gen)
    def target_nll(model, ps, ts):
        calls.extend(zip(ps, ts))
        return [nll[(p, t)] for p, t in zip(ps, ts)]

    monkeypatch.setattr(metrics, "target_nll", target_nll)
    return calls


def test_stage_arithmetic(monkeypatch, records):
    rec = records[1]  # case 12: 2 rewrites, 3 hops, 3 questions
    q = [question_prompt(x, 0) for x in rec.questions]
    texts = {
        "Michael Jordan plays the sport of": " basketball and",          # before hop 1 right, after wrong
        "Toko Yasuda plays the": " Japan's",                            # before hop 2: "japans", wrong
        "The capital of Japan is": " Tokyo",
        "The mother tongue of Toko Yasuda is": " French.",
        "The capital of France is": " the Paris",
        q[0]: " Tokyo\nQ: more", q[1]: " City of Paris", q[2]: " Rome",
    }
    nll = {
        ("Michael Jordan plays the sport of", "guitar"): 1.0, ("Michael Jordan plays the sport of", "basketball"): 2.0,
        ("The mother tongue of Toko Yasuda is", "French"): 3.0, ("The mother tongue of Toko Yasuda is", "Japanese"): 1.0,
        (q[0], "Paris"): 1.0, (q[1], "Paris"): 2.0, (q[2], "Paris"): 6.0,   # mean 3.0
        (q[0], "Tokyo"): 2.0, (q[1], "Tokyo"): 2.0, (q[2], "Tokyo"): 4.0,   # mean 2.667: the old answer wins
    }
    _fake_model_calls(monkeypatch, texts, nll)
    ev = MquakeEval(stages=("before", "after"), shots=0)
    row = ev(None, rec)
    b, a = row["before"], row["after"]
    assert a["es"] == b["es"] == [1.0, 0.0]
    # "Japan's" normalises to "japans": not the answer "Japan" (whole words), so the chain is not known
    assert b["hop"] == [1.0, 0.0, 1.0] and b["instance"] == 0.0 and row["known_chain"] is False
    assert a["hop"] == [0.0, 1.0, 1.0] and a["instance"] == 0.0
    assert b["mh_q"] == [1.0, 0.0, 0.0] and b["mh_gen"] == 1.0      # "Tokyo" cut at the newline
    assert a["mh_q"] == [0.0, 1.0, 0.0] and a["mh_gen"] == 1.0      # alias "City of Paris"
    assert a["mh_lik"] == b["mh_lik"] == 0.0
    assert a["answer_text"][0] == " Tokyo" and row["n_hops"] == 3


def test_prefetch_generates_once(monkeypatch, records):
    nll = {}
    for r in records:
        for p in [rw.cloze for rw in r.rewrites]:
            for rw in r.rewrites:
                nll[(p, rw.target_new)] = nll[(p, rw.target_true)] = 1.0
        for x in r.questions:
            nll[(question_prompt(x, 0), r.new_answer)] = nll[(question_prompt(x, 0), r.answer)] = 1.0
    calls = _fake_model_calls(monkeypatch, {}, nll)
    ev = MquakeEval(stages=("before", "after"), shots=0)
    ev.prefetch(None, records)
    n = len(calls)
    assert n == len(set(calls))  # each distinct prompt, and each (prompt, target) pair, once
    wanted = {(rw.cloze, t) for r in records for rw in r.rewrites for t in (rw.target_new, rw.target_true)}
    wanted |= {(question_prompt(x, 0), a) for r in records for x in r.questions for a in (r.new_answer, r.answer)}
    assert {c for c in calls if isinstance(c, tuple)} == wanted  # both stages' pairs are the same ones
    for r in records:
        ev(None, r)
    assert len(calls) == n  # the evaluations reuse the prefetched texts and NLLs


def _row(hops, known, es_b, es_a, inst, mh, lik):
    return {"case_id": 0, "n_hops": hops, "known_chain": known,
            "before": {"es": es_b, "instance": float(known), "mh_gen": 0.0, "mh_lik": 0.0},
            "after": {"es": es_a, "instance": inst, "mh_gen": mh, "mh_lik": lik}}


def test_summary_arithmetic_and_known_chain():
    rows = [
        _row(2, True, [0.0], [1.0], 1.0, 1.0, 1.0),
        _row(2, False, [0.0, 1.0], [1.0, 1.0], 0.0, 0.0, 1.0),
        _row(3, True, [0.0, 0.0, 0.0], [1.0, 0.0, 1.0], 0.0, 0.0, 0.0),
        _row(4, False, [0.0], [0.0], 0.0, 1.0, 0.0),
        {"case_id": 9, "error": "edit failed"},
    ]
    s = summarize_mquake(rows)
    b, c = s["breakdown"], s["columns"]
    assert b["all"]["cases"] == 4 and b["known"]["cases"] == 2
    assert c["ES"]["mean"] == pytest.approx(100 * 5 / 7) and c["ES"]["n"] == 7   # pooled over 7 rewrites
    assert b["all"]["before"]["ES"]["mean"] == pytest.approx(100 / 7)
    assert c["Hop"]["mean"] == 25.0 and c["MH"]["mean"] == 50.0 and c["MH-lik"]["mean"] == 50.0
    assert c["ES (known)"]["mean"] == 75.0 and c["MH (known)"]["mean"] == 50.0 and c["Hop (known)"]["n"] == 2
    assert b["known"]["before"]["Hop"]["mean"] == 100.0 and b["all"]["before"]["Hop"]["mean"] == 50.0
    assert b["2 hops"]["cases"] == 2 and b["2 hops"]["after"]["MH-lik"]["mean"] == 100.0
    assert b["3 hops"]["after"]["ES"]["mean"] == pytest.approx(200 / 3)
    assert b["known, 4 hops"]["cases"] == 0 and b["known, 4 hops"]["after"]["ES"] is None
    assert set(c) == set(mquake.COLUMNS)
    assert "| known, 4 hops | 0 |" in mquake.breakdown_table(b)


# --------------------------------------------------------------------------- runs on the tiny model


def _args(out, *extra):
    return ["--out", str(out), "--data", str(DATA), "--ppl-tokens", "0", "--shots", "0", "--gen-tokens", "3", *extra]


def test_cli_none_and_resume(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(tracer, "load_model", lambda *a, **k: tiny_model)
    out = tmp_path / "none"
    s = mquake.main(_args(out, "--n", "2"))
    assert s["records_evaluated"] == 2 and s["benchmark"] == "mquake" and not (out / "before").exists()
    rows = runner.read_rows(out / "records.jsonl")
    assert all(set(r) >= {"before", "after", "known_chain", "n_hops"} for r in rows)
    assert s["cases_known_chain"] == sum(r["known_chain"] for r in rows)
    assert (out / "summary.md").read_text().count("| known |") == 1 and (out / "figure.html").exists()

    seen = []
    stage = MquakeEval.stage
    monkeypatch.setattr(MquakeEval, "stage", lambda self, m, r, st: seen.append(r.case_id) or stage(self, m, r, st))
    s = mquake.main(_args(out, "--n", "4"))
    assert sorted(set(seen)) == [13, 14]  # cases 11 and 12 are not evaluated again
    assert s["records_evaluated"] == 4 and len((out / "records.jsonl").read_text().splitlines()) == 4


def test_runner_flattens_case_requests(tiny_model, tmp_path, records):
    fake = RankOneMethod()
    rows = runner.run_records(model=tiny_model, method=fake, records=records, out_dir=tmp_path,
                              evaluate=lambda m, r: {"ok": 1}, batch=2)
    assert fake.calls == [["The Louvre", "Michael Jordan", "Toko Yasuda"], ["Apple", "Berlin"]]
    assert len(rows) == 4
    assert [q.subject for q in runner.requests_of(records[1:2])] == ["Michael Jordan", "Toko Yasuda"]  # a 2-rewrite case


def test_cli_rome_batch(tiny_model, tmp_path, monkeypatch):
    from tracer import weights_hash

    monkeypatch.setattr(tracer, "load_model", lambda *a, **k: tiny_model)
    monkeypatch.setattr(runner, "edit_kwargs", lambda args: {"stats": torch.eye(tiny_model.cfg.d_mlp),
                                                            "cache_dir": tmp_path / "cache"})
    before = weights_hash(tiny_model)
    out = tmp_path / "rome"
    s = mquake.main(_args(out, "--method", "rome", "--batch", "2", "--n", "4", "--hparam", "layer=1",
                          "--hparam", "v_num_grad_steps=3"))
    assert s["model_restored"] and weights_hash(tiny_model) == before
    assert s["records_evaluated"] == 4 and s["records_failed"] == 0
    base = {r["case_id"]: r for r in runner.read_rows(out / "before" / "records.jsonl")}
    rows = runner.read_rows(out / "records.jsonl")
    assert sorted(base) == [11, 12, 13, 14]
    for r in rows:  # the unedited pass's metrics are on the edit run's line
        assert r["before"] == base[r["case_id"]]["before"] and "after" not in base[r["case_id"]]
        assert len(r["after"]["es"]) == len(r["before"]["es"])
    assert sorted(p.name for p in (out / "edits").iterdir()) == ["batch0000.safetensors", "batch0001.safetensors"]
