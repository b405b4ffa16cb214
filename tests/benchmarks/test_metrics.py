"""Metric arithmetic against hand-computed values."""

import math

import pytest

from benchmarks import metrics as M
from benchmarks.counterfact import summarize_counterfact
from benchmarks.zsre import summarize_zsre


def test_success_and_magnitude_compare_per_token_probabilities():
    # P = exp(-nll): new 0.5 vs true 0.25 -> success, magnitude 0.25
    new, true = [math.log(2), math.log(2)], [math.log(4), math.log(1.25)]
    assert M.success(new, true) == [1.0, 0.0]
    assert M.magnitude(new, true) == pytest.approx([0.25, 0.5 - 0.8])
    assert M.success(true, new) == [0.0, 1.0]  # NS direction
    with pytest.raises(ValueError, match="differ in length"):
        M.success([1.0], [1.0, 2.0])


def test_harmonic_mean():
    assert M.harmonic_mean([1.0, 0.5, 0.5]) == pytest.approx(0.6)
    assert M.harmonic_mean([100.0, 50.0, 0.0]) == 0.0
    with pytest.raises(ValueError, match="values"):
        M.harmonic_mean([])


def test_ngram_entropy_hand_computed():
    # words: the cat the cat the
    # bigrams: (the,cat) x2, (cat,the) x2 -> H2 = 1 bit
    # trigrams: (the,cat,the) x2, (cat,the,cat) x1 -> H3 = h(1/3) = 0.918296 bits
    h3 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    expected = (2 / 3 * 1.0 + 4 / 3 * h3) / 2
    assert M.ngram_entropy("the cat the cat the") == pytest.approx(expected)
    assert M.ngram_entropy("the cat the cat the") == pytest.approx(0.945531, abs=1e-6)
    assert M.ngram_entropy("Paris, Paris") == pytest.approx((2 / 3 * 1.0 + 4 / 3 * 0.0) / 2)  # 3 words, 2 bigrams
    assert M.ngram_entropy("one") == 0.0
    # degenerate repetition has low entropy, varied text high
    assert M.ngram_entropy("a a a a a a a a") == 0.0


def test_word_tokenize_splits_punctuation():
    assert M.word_tokenize("Paris, France's capital.") == ["Paris", ",", "France's", "capital", "."]


def test_tfidf_matches_sklearn_formulas():
    docs = ["paris is in france", "rome is in italy", "paris paris"]
    tf = M.Tfidf.fit(docs)
    # idf = ln((1+n)/(1+df)) + 1 with n = 3
    assert tf.idf[tf.vocab["paris"]] == pytest.approx(math.log(4 / 3) + 1)
    assert tf.idf[tf.vocab["italy"]] == pytest.approx(math.log(4 / 2) + 1)
    assert "a" not in tf.vocab  # one-character words are not tokens
    # cosine of "paris italy" with "paris": only the paris component overlaps
    ip, ii = math.log(4 / 3) + 1, math.log(2) + 1
    assert tf.similarity("paris italy", "Paris") == pytest.approx(ip / math.hypot(ip, ii))
    assert tf.similarity("unknown words", "paris") == 0.0


def test_mean_ci():
    m, ci = M.mean_ci([0.0, 1.0, 1.0, 0.0], scale=100)
    assert m == 50.0
    assert ci == pytest.approx(100 * 1.96 * math.sqrt(1 / 3) / 2)


def test_summarize_counterfact_hand_computed():
    rows = [
        {"case_id": 1, "es": 1.0, "em": 0.30, "ps": 1.0, "pm": 0.2, "ns": 0.5, "nm": 0.1, "ge": 6.0, "rs": 0.2},
        {"case_id": 2, "es": 0.0, "em": -0.10, "ps": 0.5, "pm": 0.0, "ns": 1.0, "nm": 0.3, "ge": 5.0, "rs": 0.4},
        {"case_id": 3, "error": "ValueError: boom"},  # failed edits are left out
    ]
    s = summarize_counterfact(rows, rs_column="RS")
    assert s["ES"]["mean"] == pytest.approx(50.0)
    assert s["PS"]["mean"] == pytest.approx(75.0)
    assert s["NS"]["mean"] == pytest.approx(75.0)
    assert s["S"]["mean"] == pytest.approx(3 / (1 / 50 + 1 / 75 + 1 / 75))  # 64.2857
    assert s["S"]["mean"] == pytest.approx(64.285714, abs=1e-5)
    assert s["GE"]["mean"] == pytest.approx(550.0)
    assert s["RS"]["mean"] == pytest.approx(30.0)
    assert s["EM"]["mean"] == pytest.approx(10.0)
    assert s["NM"]["mean"] == pytest.approx(20.0)
    assert s["ES"]["n"] == 2
    assert list(s)[:4] == ["S", "ES", "PS", "NS"]


def test_summarize_counterfact_without_generation_has_no_ge():
    s = summarize_counterfact([{"es": 1.0, "ps": 1.0, "ns": 1.0, "em": 0, "pm": 0, "nm": 0}])
    assert "GE" not in s and s["S"]["mean"] == pytest.approx(100.0)


def test_summarize_zsre():
    s = summarize_zsre([
        {"efficacy": 1.0, "paraphrase": 0.5, "specificity": 0.0},
        {"efficacy": 0.5, "paraphrase": 0.5, "specificity": 1.0},
    ])
    assert s["Efficacy"]["mean"] == pytest.approx(75.0)
    assert s["Paraphrase"]["mean"] == pytest.approx(50.0)
    assert s["Specificity"]["mean"] == pytest.approx(50.0)
