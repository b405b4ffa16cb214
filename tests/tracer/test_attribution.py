"""Attribution patching (`method="atp"`): the estimate is the first-order term of the
restoration it stands for, it is labelled as an estimate everywhere, and bad input is refused."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from tracer.attribution import attribution_scores
from tracer.dataset import trace_dataset
from tracer.hooks import EMBED, hook_name, hooks
from tracer.layer import cached_layer_choice, choose_edit_layer
from tracer.noise import NoiseScale
from tracer.patching import noise_hook
from tracer.result import TraceResult
from tracer.trace import prepare_runs, trace_prompt, window_layers

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "Eiffel Tower"
NOISE = NoiseScale(value=3.0)
FACTS = [
    {"known_id": 0, "prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower", "attribute": None},
    {"known_id": 1, "prompt": "Tokyo is the capital of", "subject": "Tokyo", "attribute": None},
]


def _logit_diff(model, runs):
    other = (runs.target_id + 1) % model.cfg.d_vocab
    return lambda logits: logits[:, -1, runs.target_id] - logits[:, -1, other]


def _nudged_score(model, runs, kind, t, layers, eps, metric=None):
    """The corrupted run with `eps * (clean - corrupted)` added to `kind` at token `t` in `layers`."""
    fwd = [(EMBED, noise_hook(runs.prompt.subject, runs.embed_delta))]
    for l in layers:
        clean = runs.clean_pre[l + 1][t] if kind == "resid" else runs.clean_sub[kind][l][t]
        corrupt = runs.corrupt_pre[l + 1][:, t] if kind == "resid" else runs.corrupt_sub[kind][l][:, t]

        def nudge(act, hook, step=eps * (clean[None] - corrupt)):
            act = act.clone()
            act[:, t] += step.to(act.dtype)
            return act

        fwd.append((hook_name(kind, l), nudge))
    with torch.no_grad(), hooks(model, fwd):
        logits = model(runs.corrupt_tokens)[:, -1:].double()
    if metric is None:
        return float(logits[:, -1].softmax(-1)[:, runs.target_id].mean())
    return float(metric(logits).double().mean())


def _slopes(model, runs, kind, t, window, metric, eps=1e-3) -> torch.Tensor:
    """Central finite differences of `metric` along the restoration of each cell `(t, l)`."""
    n = model.cfg.n_layers
    slopes = []
    for l in range(n):
        layers = [l] if kind == "resid" else list(window_layers(l, window, n))
        slopes.append((_nudged_score(model, runs, kind, t, layers, eps, metric)
                       - _nudged_score(model, runs, kind, t, layers, -eps, metric)) / (2 * eps))
    return torch.tensor(slopes, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["resid", "mlp", "attn"])
def test_estimate_is_the_first_order_term_of_the_restoration(tiny_model, kind):
    """AtP's (clean - corrupted) . gradient equals the derivative of the metric along the
    restoration, measured by a central finite difference on the model itself, in float64
    (the tiny models' slopes are too small for float32 differences). A logit difference: the
    tiny models' next-token probabilities are too flat, ~1/d_vocab, for a finite difference
    to resolve; the probability path is checked against the metric path below."""
    model = copy.deepcopy(tiny_model).to(torch.float64)
    runs = prepare_runs(model, PROMPT, SUBJECT, samples=3, noise=NOISE)
    metric = _logit_diff(model, runs)
    window = 2
    est = attribution_scores(model, runs, kinds=(kind,), window=window, metric=metric)[kind]
    n = model.cfg.n_layers
    assert est.shape == (len(runs.prompt.ids), n)
    t = runs.prompt.subject[1] - 1  # the last subject token
    low = _nudged_score(model, runs, kind, t, [], 0.0, metric)
    slopes = _slopes(model, runs, kind, t, window, metric)
    scale = float(slopes.abs().max())
    assert scale > 1e-8  # the comparison is not between zeros (float64 differences resolve ~1e-12)
    assert (est[t].double() - low).tolist() == pytest.approx(slopes.tolist(), abs=2e-2 * scale)


def test_probability_estimate_is_the_metric_estimate_of_the_probability(tiny_model):
    runs = prepare_runs(tiny_model, PROMPT, SUBJECT, samples=2, noise=NOISE)
    prob = attribution_scores(tiny_model, runs, window=2)
    same = attribution_scores(tiny_model, runs, window=2, metric=lambda l: l[:, -1].softmax(-1)[:, runs.target_id])
    for kind in prob:
        assert torch.allclose(prob[kind], same[kind], rtol=1e-5, atol=1e-9), kind
        assert float(prob[kind][: runs.first_changed].sub(runs.low).abs().max()) == 0.0


def test_trace_prompt_atp_is_labelled_and_exact_before_the_subject(tiny_model, tmp_path):
    exact = trace_prompt(tiny_model, PROMPT, SUBJECT, kind="mlp", samples=3, noise=NOISE, window=2)
    atp = trace_prompt(tiny_model, PROMPT, SUBJECT, kind="mlp", samples=3, noise=NOISE, window=2, method="atp")
    assert exact.method == "exact" and atp.method == "atp"
    assert atp.scores.shape == exact.scores.shape and (atp.low, atp.high) == pytest.approx((exact.low, exact.high))
    a = atp.subject[0]
    assert torch.all(atp.scores[:a] == exact.scores[:a])  # unchanged tokens: low, exactly, in both
    assert "AtP estimate" in atp.title() and "estimate" not in exact.title()
    assert "est." in json.dumps(atp.plot().to_dict())
    back = TraceResult.from_dict(json.loads(json.dumps(atp.to_dict())))
    assert back.method == "atp" and torch.equal(back.scores, atp.scores)
    old = atp.to_dict()
    del old["method"]  # a result saved before attribution patching reads as exact
    assert TraceResult.from_dict(old).method == "exact"


def test_atp_refuses_what_it_cannot_estimate(tiny_model):
    with pytest.raises(ValueError, match="method 'bogus' is unknown"):
        trace_prompt(tiny_model, PROMPT, SUBJECT, noise=NOISE, method="bogus")
    with pytest.raises(ValueError, match="severed"):
        trace_prompt(tiny_model, PROMPT, SUBJECT, noise=NOISE, severed="mlp", method="atp")
    with pytest.raises(ValueError, match="metric_at"):
        trace_prompt(tiny_model, PROMPT, SUBJECT, noise=NOISE, method="atp", metric=lambda a: a[:, -1, 0],
                     metric_at="blocks.0.hook_resid_post")
    runs = prepare_runs(tiny_model, PROMPT, SUBJECT, samples=2, noise=NOISE)
    with pytest.raises(ValueError, match="kinds"):
        attribution_scores(tiny_model, runs, kinds=("embed",))
    with pytest.raises(ValueError, match="metric returned"):
        attribution_scores(tiny_model, runs, metric=lambda logits: logits[:, -1, 0].mean())
    with pytest.raises(ValueError, match="differentiable"):
        attribution_scores(tiny_model, runs, metric=lambda logits: (logits[:, -1].argmax(-1) == 3).float())
    with pytest.raises(ValueError, match="method"):
        trace_dataset(tiny_model, FACTS, noise=NOISE, method="fast")


def test_trace_dataset_and_layer_choice_from_estimates(tiny_model, tmp_path):
    out = tmp_path / "atp"
    res = trace_dataset(tiny_model, FACTS, samples=2, noise=NOISE, window=1, out=out, progress=False, method="atp")
    assert res.method == "atp" and res.summary()["estimate"] is True
    assert json.loads((out / "config.json").read_text())["method"] == "atp"
    assert "AtP estimate" in json.dumps(res.plot_lines().to_dict())
    exact = trace_dataset(tiny_model, FACTS, samples=2, noise=NOISE, window=1, progress=False)
    assert exact.known_ids == res.known_ids and exact.method == "exact"
    with pytest.raises(ValueError, match="other settings"):  # one folder holds one method
        trace_dataset(tiny_model, FACTS, samples=2, noise=NOISE, window=1, out=out, progress=False)
    choice = choose_edit_layer(tiny_model, FACTS, samples=2, noise=NOISE, window=1, progress=False,
                               cache_dir=tmp_path / "cache", method="atp")
    assert choice.method == "atp" and "AtP estimate" in choice.plot().layout.title.text
    assert cached_layer_choice(tiny_model, cache_dir=tmp_path / "cache") is None  # the editor reads exact choices only


def test_trace_all_atp_shares_one_pass_and_matches_each_kind(tiny_model, monkeypatch):
    import tracer.trace as trace

    calls = []
    real = trace.attribution_scores
    monkeypatch.setattr(trace, "attribution_scores", lambda *a, **k: calls.append(k["kinds"]) or real(*a, **k))
    both = trace.trace_all(tiny_model, PROMPT, SUBJECT, samples=2, noise=NOISE, window=2, method="atp")
    assert calls == [("resid", "mlp", "attn")]
    with pytest.raises(TypeError, match="windw"):
        trace.trace_all(tiny_model, PROMPT, SUBJECT, samples=2, noise=NOISE, windw=3, method="atp")
    for kind, res in both.items():
        one = trace_prompt(tiny_model, PROMPT, SUBJECT, kind=kind, samples=2, noise=NOISE, window=2, method="atp")
        assert res.method == "atp" and torch.allclose(res.scores, one.scores, atol=1e-7), kind


def test_agreement_of_a_trace_with_itself_and_with_its_estimate(tiny_model, tmp_path):
    from benchmarks.atp_agreement import compare_fact, summarize
    from tracer.resume import read_jsonl

    for method in ("exact", "atp"):
        trace_dataset(tiny_model, FACTS, samples=2, noise=NOISE, window=1, out=tmp_path / method, progress=False, method=method)
    exact = read_jsonl(tmp_path / "exact" / "traces.jsonl", key="known_id")
    atp = read_jsonl(tmp_path / "atp" / "traces.jsonl", key="known_id")
    ids = [i for i, r in exact.items() if r["correct"]]
    same = {i: compare_fact(exact[i], exact[i]) for i in ids}
    assert all(f[k]["spearman"] == pytest.approx(1.0) and f[k]["top_cell_match"] for f in same.values() for k in f)
    est = {i: compare_fact(exact[i], atp[i]) for i in ids}
    s = summarize(est)
    assert set(s) == {"resid", "mlp", "attn"} and all(-1 <= s[k]["spearman_mean"] <= 1 for k in s)
    flipped = {**exact[ids[0]], "scores": {k: [[-v for v in row] for row in m] for k, m in exact[ids[0]]["scores"].items()}}
    assert compare_fact(exact[ids[0]], flipped)["mlp"]["spearman"] == pytest.approx(-1.0)


@pytest.mark.parametrize("kind", ["resid", "mlp", "attn"])
def test_log_space_estimate_is_the_first_order_term_of_log_p(tiny_model, kind):
    """With one noise sample, "atp-logp" is `p · exp(Δ̂ log p)`, so `log(score / low)` is the
    estimated change of log p(target): the derivative of log p along the restoration, measured
    by a central finite difference in float64 (log p resolves where p itself is too flat)."""
    model = copy.deepcopy(tiny_model).to(torch.float64)
    runs = prepare_runs(model, PROMPT, SUBJECT, samples=1, noise=NOISE)
    logp = lambda logits: logits[:, -1].log_softmax(-1)[:, runs.target_id]  # noqa: E731
    est = attribution_scores(model, runs, kinds=(kind,), window=2, method="atp-logp")[kind].double()
    t = runs.prompt.subject[1] - 1
    slopes = _slopes(model, runs, kind, t, 2, logp)
    scale = float(slopes.abs().max())
    assert scale > 1e-8
    assert (est[t] / runs.low).log().tolist() == pytest.approx(slopes.tolist(), abs=2e-2 * scale + 1e-6)


def _amplified(model, size):
    """One-sample runs whose clean states are moved `k` times further from the corrupted ones,
    `k` chosen so that the largest linear `Δ̂ log p` is `size`: the tiny models' restorations
    are too small for `e^Δ` and `1 + Δ` to differ, and `Δ̂` is linear in the clean state."""
    runs = prepare_runs(model, PROMPT, SUBJECT, samples=1, noise=NOISE)
    delta = max(float((v.double() - runs.low).abs().max()) for v in attribution_scores(model, runs, window=2).values()) / runs.low
    k = size / delta
    pre = runs.corrupt_pre[:, 0] + k * (runs.clean_pre - runs.corrupt_pre[:, 0])
    sub = {kind: [c[0] + k * (v - c[0]) for v, c in zip(runs.clean_sub[kind], runs.corrupt_sub[kind])] for kind in runs.clean_sub}
    return dataclasses.replace(runs, clean_pre=pre, clean_sub=sub)


def test_log_space_estimate_bounds_the_linear_one_from_above(tiny_model):
    """`p e^x >= p (1 + x)`: "atp-logp" is never below "atp" (below the cap at 1), and both are
    `low` before the subject."""
    runs = _amplified(tiny_model, 2.0)
    lin = attribution_scores(tiny_model, runs, window=2)
    log = attribution_scores(tiny_model, runs, window=2, method="atp-logp")
    for kind in lin:
        below = log[kind] < 1.0
        assert torch.all(log[kind][below] >= lin[kind][below] - 1e-7) and torch.all(log[kind] <= 1.0), kind
        assert torch.all(log[kind][: runs.first_changed] == lin[kind][: runs.first_changed]), kind
    assert max(float((log[k] - lin[k]).max()) for k in lin) > 0.1 * runs.low  # the curvature term is there


def test_log_space_estimate_is_the_exponential_of_the_linear_log_term(tiny_model):
    """With one sample, `atp` gives `low + p·Δ` and `atp-logp` gives `min(1, p·e^Δ)` for the same
    `Δ = Δ̂ log p`, so `log(atp-logp / low) == (atp - low) / low` cell by cell (below the cap)."""
    runs = _amplified(tiny_model, 2.0)
    lin = attribution_scores(tiny_model, runs, window=2)
    log = attribution_scores(tiny_model, runs, window=2, method="atp-logp")
    for kind in lin:
        below = log[kind] < 0.99
        delta = (lin[kind].double()[below] - runs.low) / runs.low
        assert (log[kind].double()[below] / runs.low).log().tolist() == pytest.approx(delta.tolist(), abs=1e-3), kind


def test_log_space_estimate_is_capped_at_one(tiny_model):
    """A restoration estimated to raise log p by more than -log p would give a probability above 1."""
    runs = _amplified(tiny_model, 50.0)
    est = attribution_scores(tiny_model, runs, window=2, method="atp-logp")
    assert all(float(v.max()) <= 1.0 for v in est.values())
    assert any(float(v.max()) == 1.0 for v in est.values())


def test_log_space_estimate_is_labelled_and_refuses_a_metric(tiny_model, tmp_path):
    res = trace_prompt(tiny_model, PROMPT, SUBJECT, kind="attn", samples=2, noise=NOISE, window=2, method="atp-logp")
    assert res.method == "atp-logp" and res.title().endswith("(AtP estimate, log p)")
    with pytest.raises(ValueError, match="needs the default probability metric"):
        trace_prompt(tiny_model, PROMPT, SUBJECT, samples=2, noise=NOISE, method="atp-logp",
                     metric=lambda logits: logits[:, -1, 0])
    runs = prepare_runs(tiny_model, PROMPT, SUBJECT, samples=2, noise=NOISE)
    with pytest.raises(ValueError, match="not an attribution-patching estimate"):
        attribution_scores(tiny_model, runs, method="exact")
    out = tmp_path / "logp"
    ds = trace_dataset(tiny_model, FACTS, samples=2, noise=NOISE, window=1, out=out, progress=False, method="atp-logp")
    assert ds.summary()["estimate"] is True and json.loads((out / "config.json").read_text())["method"] == "atp-logp"
    with pytest.raises(ValueError, match="other settings"):  # an "atp-logp" folder is not resumed as "atp"
        trace_dataset(tiny_model, FACTS, samples=2, noise=NOISE, window=1, out=out, progress=False, method="atp")
