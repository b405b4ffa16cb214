"""Tracing as TransformerLens hooks (tracer/patching.py) and trace_prompt(metric=...).

The two examples of docs/interop.md run here on the tiny model: TransformerLens's own
`patching.get_act_patch_*` inside `model.hooks(corruption_hooks(...))`, and a
logit-difference trace.
"""

from __future__ import annotations

import pytest
import torch

from tracer import corruption_hooks, restoration_hooks, trace_all, trace_prompt
from tracer.hooks import hook_name
from tracer.model import TL_API, run_until
from tracer.noise import NoiseCache, NoiseScale
from tracer.prompts import locate_subject, target_ids
from tracer.trace import patched_score, prepare_runs, window_layers

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"
NOISE = NoiseScale(value=3.0)
S = 3  # noise samples


@pytest.fixture
def runs(tiny_model):
    return prepare_runs(tiny_model, PROMPT, SUBJECT, samples=S, noise=NOISE, seed=1)


def _prob(target_id):
    """Per-row target probability at the last position: [batch, pos, d_vocab] -> [batch]."""
    return lambda logits: logits[:, -1].float().softmax(-1)[:, target_id]


def _logit(target_id):
    """Per-row target logit: the tiny 4.x model's probabilities are nearly flat (spread ~1e-5),
    its logits spread ~1e-3, so comparisons of logits can tell cells apart on both versions."""
    return lambda logits: logits[:, -1, target_id]


#: (metric factory, tolerance of an equality, least spread of a trace table)
METRICS = {"prob": (_prob, 1e-6, 0.0), "logit": (_logit, 1e-5, 1e-4)}


@pytest.mark.parametrize("noise", [NOISE, 2.0])
def test_corruption_hooks_add_the_noise_trace_prompt_adds(tiny_model, noise):
    cache = NoiseCache(use_disk=False)
    runs = prepare_runs(tiny_model, PROMPT, SUBJECT, samples=S, noise=noise, seed=7, noise_cache=cache)
    pt = runs.prompt
    tokens = pt.tensor()
    hooks = corruption_hooks(tiny_model, tokens, pt.subject, noise=noise, samples=S, seed=7, noise_cache=cache)
    with tiny_model.hooks(fwd_hooks=hooks):
        first = run_until(tiny_model, tokens.expand(S, -1), hook_name("resid_pre", 0))
        logits = tiny_model(tokens.expand(S, -1))
    assert torch.equal(first, runs.corrupt_pre[0])  # the same noise tensor, bit for bit
    assert not torch.equal(first, runs.clean_pre[0].expand(S, -1, -1))
    assert float(_prob(runs.target_id)(logits).mean()) == pytest.approx(runs.low, abs=1e-6)


def test_corruption_batch_is_the_prompt_repeated(tiny_model):
    pt = locate_subject(tiny_model, PROMPT, SUBJECT)
    tokens = pt.tensor()
    first = hook_name("resid_pre", 0)
    with tiny_model.hooks(fwd_hooks=corruption_hooks(tiny_model, tokens, pt.subject, noise=NOISE, samples=S, seed=1)):
        one = run_until(tiny_model, tokens.expand(S, -1), first)
        two = run_until(tiny_model, tokens.expand(2 * S, -1), first)  # row r gets sample r % S
        assert torch.equal(two[:S], one) and torch.equal(two[S:], one)
        assert not torch.equal(one[0], one[1])  # each sample its own noise
        with pytest.raises(ValueError, match="batch size 1 is not a multiple of samples 3"):
            tiny_model(tokens)
        with pytest.raises(ValueError, match="positions"):
            tiny_model(tokens[:, :-1].expand(S, -1))
    with pytest.raises(ValueError, match="subject_span"):
        corruption_hooks(tiny_model, tokens, (3, 99), noise=NOISE)
    with pytest.raises(ValueError, match="samples 0"):
        corruption_hooks(tiny_model, tokens, pt.subject, noise=NOISE, samples=0)


@pytest.mark.parametrize("metric", list(METRICS))
@pytest.mark.parametrize("kind,window", [("resid", 1), ("mlp", 2), ("attn", 3)])
def test_restoration_hooks_give_trace_prompt_scores(tiny_model, runs, kind, window, metric):
    make, tol, spread = METRICS[metric]
    fn = make(runs.target_id)
    pt = runs.prompt
    tokens = pt.tensor()
    n = tiny_model.cfg.n_layers
    _, clean = tiny_model.run_with_cache(tokens)
    res = trace_prompt(tiny_model, PROMPT, SUBJECT, kind=kind, window=window, runs=runs, metric=None if metric == "prob" else fn)
    assert float(res.scores.max() - res.scores.min()) > spread
    corrupt = corruption_hooks(tiny_model, tokens, pt.subject, noise=NOISE, samples=S, seed=1)
    for t in range(pt.subject[0], len(pt.ids)):
        for layer in range(n):
            layers = [layer] if kind == "resid" else window_layers(layer, window, n)
            with tiny_model.hooks(fwd_hooks=corrupt + restoration_hooks(clean, kind=kind, positions=t, layers=layers)):
                p = float(fn(tiny_model(tokens.expand(S, -1))).mean())
            assert p == pytest.approx(float(res.scores[t, layer]), abs=tol), (t, layer)
    if kind == "resid" and metric == "prob":  # and the same as the reference implementation's patch
        assert patched_score(tiny_model, runs, [(4, 1)]) == pytest.approx(float(res.scores[4, 1]), abs=1e-6)


def test_restoring_from_a_corrupted_cache_severs_a_path(tiny_model, runs):
    # trace_prompt(severed="mlp"): restore resid (t, l), hold the MLP output at t at its
    # corrupted value in layers l+1.. ; with hooks, "restore" from the corrupted run's cache
    pt = runs.prompt
    tokens = pt.tensor()
    n = tiny_model.cfg.n_layers
    corrupt = corruption_hooks(tiny_model, tokens, pt.subject, noise=NOISE, samples=S, seed=1)
    _, clean = tiny_model.run_with_cache(tokens)
    with tiny_model.hooks(fwd_hooks=corrupt):
        _, corrupted = tiny_model.run_with_cache(tokens.expand(S, -1))  # batch S: one row per sample
    # the target's logit: the tiny 4.x model's probabilities are too flat to show severing
    logit = lambda logits: logits[:, -1, runs.target_id]  # noqa: E731
    res = trace_prompt(tiny_model, PROMPT, SUBJECT, severed="mlp", runs=runs, metric=logit)
    plain = trace_prompt(tiny_model, PROMPT, SUBJECT, runs=runs, metric=logit)
    assert (plain.scores - res.scores).abs().max() > 1e-4  # severing matters somewhere (TL 4 tiny: 7e-4)
    for t in range(pt.subject[0], len(pt.ids)):
        for layer in range(n):
            hooks = corrupt + restoration_hooks(clean, kind="resid", positions=t, layers=layer)
            if layer + 1 < n:
                hooks += restoration_hooks(corrupted, kind="mlp", positions=t, layers=range(layer + 1, n))
            with tiny_model.hooks(fwd_hooks=hooks):
                p = float(logit(tiny_model(tokens.expand(S, -1))).mean())
            assert p == pytest.approx(float(res.scores[t, layer]), abs=1e-5), (t, layer)
    t = pt.last_subject
    with tiny_model.hooks(fwd_hooks=restoration_hooks(corrupted, kind="mlp", positions=t, layers=0)):
        with pytest.raises(ValueError, match="clean_cache has batch 3"):
            tiny_model(tokens.expand(2, -1))


def test_restoration_hooks_bad_input(tiny_model):
    tokens = locate_subject(tiny_model, PROMPT, SUBJECT).tensor()
    _, clean = tiny_model.run_with_cache(tokens)
    with pytest.raises(ValueError, match="kind 'embed'"):
        restoration_hooks(clean, kind="embed", positions=0, layers=0)
    with pytest.raises(ValueError, match="no 'blocks.9.hook_resid_post'"):
        restoration_hooks(clean, kind="resid", positions=0, layers=9)
    with pytest.raises(ValueError, match=r"positions \[40\]"):
        restoration_hooks(clean, kind="mlp", positions=[1, 40], layers=0)
    with pytest.raises(ValueError, match="layers"):
        restoration_hooks(clean, kind="mlp", positions=1, layers=[])



def test_restoration_hooks_refuse_a_cache_of_other_tokens(tiny_model):
    tokens = locate_subject(tiny_model, PROMPT, SUBJECT).tensor()  # [1, pos]
    _, clean = tiny_model.run_with_cache(tokens)
    n = tokens.shape[1]
    hooks = restoration_hooks(clean, kind="resid", positions=[1, -1], layers=[0, 1])
    for other in (tokens[:, :-2], torch.cat([tokens, tokens[:, :3]], 1)):  # shorter, longer (and a pos fitting both)
        with tiny_model.hooks(fwd_hooks=hooks):
            with pytest.raises(ValueError, match=rf"recorded on {n} tokens .*the patched run has {other.shape[1]} tokens"):
                tiny_model(other)
    _, flat = tiny_model.run_with_cache(tokens, remove_batch_dim=True)  # [pos, d_model]: no batch axis
    with pytest.raises(ValueError, match=r"expected \[batch, pos, d_model\]"):
        restoration_hooks(flat, kind="mlp", positions=1, layers=0)
    with tiny_model.hooks(fwd_hooks=hooks):  # the same tokens still work
        tiny_model(tokens)

# --- docs/interop.md, example (a): TransformerLens patching on our corrupted input ----------


@pytest.mark.parametrize("metric", list(METRICS))
@pytest.mark.parametrize("tl_fn,kind", [("get_act_patch_resid_pre", "resid"), ("get_act_patch_mlp_out", "mlp"), ("get_act_patch_attn_out", "attn")])
def test_transformer_lens_patching_inside_corruption_hooks_matches_trace_prompt(tiny_model, tl_fn, kind, metric):
    from transformer_lens import patching

    model = tiny_model
    make, tol, spread = METRICS[metric]
    pt = locate_subject(model, PROMPT, SUBJECT)
    tokens = pt.tensor()  # [1, pos]
    _, clean_cache = model.run_with_cache(tokens)
    target = target_ids(model, PROMPT, "Paris")[0]
    fn = make(target)
    # metric="prob" is trace_prompt's default (target probability) path
    res = trace_prompt(model, PROMPT, SUBJECT, target=target, kind=kind, window=1, samples=S, noise=NOISE, seed=1, metric=None if metric == "prob" else fn)
    with model.hooks(fwd_hooks=corruption_hooks(model, tokens, pt.subject, noise=NOISE, samples=S, seed=1)):
        # TransformerLens 3.9's metric returns a scalar: average the noise samples (the batch)
        tl = getattr(patching, tl_fn)(model, tokens.expand(S, -1), clean_cache, lambda logits: fn(logits).mean())
    assert tl.shape == (model.cfg.n_layers, len(pt.ids))  # [layer, pos]
    if kind == "resid":  # resid_pre[l + 1] is resid_post[l]: TL's layers 1.. are our layers ..n-2
        assert (tl[1:].T - res.scores[:, :-1]).abs().max() < tol
    else:  # one layer at a time is our window of 1
        assert (tl.T - res.scores).abs().max() < tol
    assert float(res.scores.max() - res.scores.min()) > spread


def test_transformer_lens_4_reduce_mean_takes_our_per_row_metric(tiny_model):
    if TL_API == 3:
        pytest.skip("TransformerLens 3.9's patching has no reduce=; its metric must return a scalar (tested above)")
    from transformer_lens import patching

    model = tiny_model
    pt = locate_subject(model, PROMPT, SUBJECT)
    tokens = pt.tensor()
    _, clean_cache = model.run_with_cache(tokens)
    target = target_ids(model, PROMPT, "Paris")[0]
    res = trace_prompt(model, PROMPT, SUBJECT, kind="resid", samples=S, noise=NOISE, seed=1, metric=_logit(target))
    with model.hooks(fwd_hooks=corruption_hooks(model, tokens, pt.subject, noise=NOISE, samples=S, seed=1)):
        out = patching.get_act_patch_resid_pre(model, tokens.expand(S, -1), clean_cache, _logit(target), reduce="none", baseline=True)
    assert out.values.shape == (model.cfg.n_layers, len(pt.ids), S)  # per noise sample
    assert (out.mean()[1:].T - res.scores[:, :-1]).abs().max() < 1e-5
    assert float(out.baseline.mean()) == pytest.approx(res.low, abs=1e-5)
    assert float(res.scores.max() - res.scores.min()) > 1e-4


# --- docs/interop.md, example (b): a logit-difference trace ---------------------------------


def test_logit_difference_trace(tiny_model):
    model = tiny_model
    paris, rome = target_ids(model, PROMPT, "Paris")[0], target_ids(model, PROMPT, "Rome")[0]

    def logit_diff(logits):  # [batch, pos, d_vocab] -> [batch]
        return logits[:, -1, paris] - logits[:, -1, rome]

    res = trace_prompt(model, PROMPT, SUBJECT, kind="mlp", window=2, samples=S, noise=NOISE, seed=1, metric=logit_diff)
    pt = locate_subject(model, PROMPT, SUBJECT)
    tokens = pt.tensor()
    clean_logits, clean = model.run_with_cache(tokens)
    assert res.high == pytest.approx(float(logit_diff(clean_logits)[0]), abs=1e-5)
    corrupt = corruption_hooks(model, tokens, pt.subject, noise=NOISE, samples=S, seed=1)
    with model.hooks(fwd_hooks=corrupt):
        assert res.low == pytest.approx(float(logit_diff(model(tokens.expand(S, -1))).mean()), abs=1e-5)
    n = model.cfg.n_layers
    for t in range(len(pt.ids)):
        for layer in range(n):
            hooks = corrupt + restoration_hooks(clean, kind="mlp", positions=t, layers=window_layers(layer, 2, n))
            with model.hooks(fwd_hooks=hooks):
                want = float(logit_diff(model(tokens.expand(S, -1))).mean())
            assert float(res.scores[t, layer]) == pytest.approx(want, abs=1e-5), (t, layer)
    assert float(res.scores.max() - res.scores.min()) > 1e-4 and abs(res.high - res.low) > 1e-4


def test_probability_metric_reproduces_the_default_trace(tiny_model, runs):
    prob = _prob(runs.target_id)
    for kind in ("resid", "attn"):
        plain = trace_prompt(tiny_model, PROMPT, SUBJECT, kind=kind, window=2, runs=runs)
        as_metric = trace_prompt(tiny_model, PROMPT, SUBJECT, kind=kind, window=2, runs=runs, metric=prob)
        assert (plain.scores - as_metric.scores).abs().max() < 1e-6
        assert as_metric.high == pytest.approx(plain.high, abs=1e-6) and as_metric.low == pytest.approx(plain.low, abs=1e-6)
    severed = trace_prompt(tiny_model, PROMPT, SUBJECT, severed="mlp", runs=runs, metric=prob)
    assert (severed.scores - trace_prompt(tiny_model, PROMPT, SUBJECT, severed="mlp", runs=runs).scores).abs().max() < 1e-6
    both = trace_all(tiny_model, PROMPT, SUBJECT, samples=S, noise=NOISE, seed=1, window=2, metric=lambda l: -prob(l))
    assert both["attn"].low == pytest.approx(-plain.low, abs=1e-6)


def test_metric_must_return_one_number_per_row(tiny_model, runs):
    with pytest.raises(ValueError, match=r"one number per batch row.*without \.mean\(\)"):
        trace_prompt(tiny_model, PROMPT, SUBJECT, runs=runs, metric=lambda logits: logits[:, -1, 0].mean())
    with pytest.raises(ValueError, match="one number per batch row"):
        trace_prompt(tiny_model, PROMPT, SUBJECT, runs=runs, metric=lambda logits: logits[:, -1, :2])


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post", "blocks.1.hook_mlp_out"])
def test_metric_at_a_plain_state_matches_the_hooks_in_every_cell(tiny_model, hook):
    model = tiny_model
    pt = locate_subject(model, PROMPT, SUBJECT)
    tokens = pt.tensor()
    _, clean = model.run_with_cache(tokens)
    fn = lambda acts: acts[:, -1, :4].sum(-1)  # noqa: E731
    corrupt = corruption_hooks(model, tokens, pt.subject, noise=NOISE, samples=S, seed=1)
    n = model.cfg.n_layers
    for kind in ("resid", "mlp"):
        res = trace_prompt(model, PROMPT, SUBJECT, kind=kind, window=1, samples=S, noise=NOISE, seed=1, metric=fn,
                           metric_at=hook)
        for t in range(len(pt.ids)):
            for layer in range(n):
                with torch.no_grad(), model.hooks(fwd_hooks=corrupt + restoration_hooks(clean, kind=kind, positions=t, layers=layer)):
                    want = float(fn(run_until(model, tokens.expand(S, -1), hook)).mean())
                assert float(res.scores[t, layer]) == pytest.approx(want, abs=1e-5), (kind, t, layer)
    with pytest.raises(ValueError, match="attention pattern"):
        trace_prompt(model, PROMPT, SUBJECT, samples=S, metric=fn, metric_at="blocks.1.attn.hook_pattern")
