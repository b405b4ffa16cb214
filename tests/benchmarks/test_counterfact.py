"""CounterFact evaluation on the tiny model, and the CLI end to end (resume included)."""

import json

import pytest
import torch

import tracer
from benchmarks import counterfact, metrics, runner
from benchmarks.counterfact import RS_FALLBACK, Reference, evaluate_counterfact
from benchmarks.data import load_counterfact
from tests.conftest import FIXTURES
from tracer import encode, target_probs


@pytest.fixture
def records():
    return load_counterfact(FIXTURES / "counterfact_tiny.json")


def test_evaluate_matches_target_probs(tiny_model, records):
    r = records[0]
    row = evaluate_counterfact(tiny_model, r, gen_tokens=0)
    new = target_probs(tiny_model, [r.rewrite_prompt], [r.target_new]).mean_nll.item()
    true = target_probs(tiny_model, [r.rewrite_prompt], [r.target_true]).mean_nll.item()
    assert row["nll"]["rewrite"]["new"][0] == pytest.approx(new, abs=1e-5)
    assert row["es"] == float(new < true)
    ns = [float(t < n) for n, t in zip(row["nll"]["neighborhood"]["new"], row["nll"]["neighborhood"]["true"])]
    assert row["ns"] == pytest.approx(sum(ns) / len(ns))
    assert "ge" not in row and "rs" not in row


def _slow_greedy(model, prompt, steps):
    ids = encode(model, prompt)
    for _ in range(steps):
        logits = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return model.tokenizer.decode(ids, skip_special_tokens=True)


def test_greedy_generate_matches_full_forward(tiny_model):
    prompts = ["The Eiffel Tower is", "Tokyo is the capital of Japan and"]
    fast = metrics.greedy_generate(tiny_model, prompts, max_new_tokens=6)
    assert fast == [_slow_greedy(tiny_model, p, 6) for p in prompts]
    assert fast[0].startswith("The Eiffel Tower is")


def test_greedy_tokens_match_recomputing(tiny_model):
    # TransformerLens 3.x: left-padded batch + key/value cache; 4.x: right-padded, the prefix rerun
    from tracer.model import greedy_tokens

    seqs = [tracer.encode(tiny_model, p) for p in ("The Eiffel Tower is", "Tokyo is the capital of Japan and")]
    got = greedy_tokens(tiny_model, seqs, 6)
    assert len(seqs[0]) != len(seqs[1])  # exercises the padding
    for s, g in zip(seqs, got):
        assert tiny_model.tokenizer.decode(s + g, skip_special_tokens=True) == _slow_greedy(tiny_model, tiny_model.tokenizer.decode(s, skip_special_tokens=True), 6)


def test_generation_metrics_and_fallback_reference(tiny_model, records):
    ref = Reference(tfidf=metrics.Tfidf.fit(["the city of paris", "rome italy", "the colosseum"]))
    assert ref.fallback and ref.column == RS_FALLBACK
    row = evaluate_counterfact(tiny_model, records[0], gen_tokens=3, reference=ref)
    assert len(row["text"]) == 2  # three generation prompts, two distinct
    texts = [row["text"][0], row["text"][0], row["text"][1]]
    assert row["ge"] == pytest.approx(sum(metrics.ngram_entropy(t) for t in texts) / 3)
    refs = " ".join(p + " Paris" for p in records[0].attribute_prompts)
    assert row["rs"] == pytest.approx(ref.tfidf.similarity(" ".join(texts), refs))


def test_prefetched_generation_gives_the_same_rows(tiny_model, records):
    ev = counterfact.CounterFactEval(gen_tokens=4)
    ev.prefetch(tiny_model, records[:3])
    assert len(ev._texts) == len({p for r in records[:3] for p in r.generation_prompts})
    for r in records[:3]:
        assert ev(tiny_model, r) == evaluate_counterfact(tiny_model, r, gen_tokens=4)
    ev.prefetch(tiny_model, records[:1])  # a new model state: earlier texts are dropped
    assert set(ev._texts) == set(records[0].generation_prompts)


def test_cli_end_to_end_and_resume(tiny_model, tmp_path, monkeypatch, capsys, tiny_wikitext):
    monkeypatch.setattr(tracer, "load_model", lambda *a, **k: tiny_model)
    out = tmp_path / "run"
    argv = ["--method", "none", "--n", "2", "--out", str(out), "--data", str(FIXTURES / "counterfact_tiny.json"),
            "--gen-tokens", "3", "--wikitext", str(tiny_wikitext), "--ppl-tokens", "40", "--ppl-every", "1"]
    s1 = counterfact.main(argv)
    printed = capsys.readouterr().out
    assert "| S | ES | PS | NS | GE |" in printed and RS_FALLBACK in printed
    for col in ("S", "ES", "PS", "NS", "GE", RS_FALLBACK, "EM", "PM", "NM"):
        assert col in s1["columns"], col
    assert s1["records_evaluated"] == 2 and s1["model_restored"]
    assert s1["perplexity"]["before"] == pytest.approx(s1["perplexity"]["after"])  # 'none' changes nothing
    assert (out / "summary.md").exists() and (out / "figure.html").exists()
    lines = (out / runner.RECORDS).read_text().splitlines()
    assert len(lines) == 2
    # rerun with one more record: the first two are not redone
    calls = []
    real = counterfact.evaluate_counterfact
    monkeypatch.setattr(counterfact, "evaluate_counterfact", lambda m, r, **k: calls.append(r.case_id) or real(m, r, **k))
    s2 = counterfact.main([*argv[:3], "3", *argv[4:]])
    assert calls == [103]
    assert s2["records_evaluated"] == 3
    assert json.loads((out / "summary.json").read_text())["records_requested"] == 3


def test_cli_unknown_method(tmp_path):
    # refused before the TF-IDF reference reads WikiText (absent here): the error names the method
    with pytest.raises(ValueError, match="method 'bogus'"):
        counterfact.main(["--method", "bogus", "--out", str(tmp_path), "--data", str(FIXTURES / "counterfact_tiny.json"),
                          "--wikitext", str(tmp_path / "absent.txt")])


def test_target_nll_matches_tracer(tiny_model):
    prompts = ["The capital of France is", "Michael Jordan plays the sport of"]
    targets = ["Paris", "basketball and guitar"]
    ours = metrics.target_nll(tiny_model, prompts, targets)
    assert ours == pytest.approx(target_probs(tiny_model, prompts, targets).mean_nll.tolist(), abs=1e-5)
    # final_logits skips the unembedding module's per-call weight copy; same values as a full forward pass
    tokens = tiny_model.to_tokens(prompts[0])
    with torch.no_grad():
        full = tiny_model(tokens)[0]
        ours = tracer.final_logits(tiny_model, tracer.final_resid(tiny_model, tokens))[0]
    assert torch.allclose(ours, full, atol=1e-5)


FEW_SHOT = "Q: Where is the Eiffel Tower? A: Paris. Q: Where is the Colosseum? A: Rome. Q: "


def test_a_shared_few_shot_prefix_is_run_once_and_changes_nothing(tiny_model, monkeypatch):
    # few-shot prompts share a long prefix: teacher forcing (both APIs) and generation
    # (TransformerLens 3.x's cache) run it once per batch and resume after it
    import tracer.model as tm

    calls = []
    real = tm.shared_prefix_run
    monkeypatch.setattr(tm, "shared_prefix_run", lambda *a, **k: calls.append(k.get("batch")) or real(*a, **k))
    prompts = [FEW_SHOT + q for q in ("Where is Tokyo? A:", "Where is the Louvre? A:", "Where? A:")]
    seqs = [encode(tiny_model, p) for p in prompts]
    assert tm.common_prefix(seqs, cap=99) >= tm.SHARED_PREFIX_MIN
    targets = [" Japan", " Paris France", " Rome"]
    batched = metrics.target_nll(tiny_model, prompts, targets)
    assert None in calls  # the teacher-forced batch resumed after the prefix
    one_by_one = [metrics.target_nll(tiny_model, [p], [t])[0] for p, t in zip(prompts, targets)]
    assert batched == pytest.approx(one_by_one, abs=1e-5)
    got = tm.greedy_tokens(tiny_model, seqs, 5)
    assert (len(seqs) in calls) == (tm._hooked_kv_cache(tiny_model, 1) is not None)
    for p, s, g in zip(prompts, seqs, got):
        assert tiny_model.tokenizer.decode(s + g, skip_special_tokens=True) == _slow_greedy(tiny_model, p, 5)


def test_common_prefix():
    from tracer.model import common_prefix

    assert common_prefix([[2, 5, 7, 9], [2, 5, 7, 1], [2, 5, 8]], cap=10) == 2
    assert common_prefix([[2, 5, 7], [2, 5, 7, 1]], cap=10) == 3
    assert common_prefix([[2, 5, 7], [2, 5, 7, 1]], cap=1) == 1
    assert common_prefix([[3], [2]], cap=5) == 0
