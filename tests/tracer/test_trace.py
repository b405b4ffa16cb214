"""Causal tracing core (tracer/trace.py) on the tiny random model, plus Gemma integration checks."""

from __future__ import annotations

import pytest
import torch

from tracer.noise import NoiseScale
from tracer.prompts import target_ids
from tracer.trace import (
    patched_score,
    prepare_runs,
    reference_scores,
    restore_scores,
    trace_all,
    trace_prompt,
    window_layers,
)

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"
NOISE = NoiseScale(value=3.0)


@pytest.fixture
def runs(tiny_model):
    return prepare_runs(tiny_model, PROMPT, SUBJECT, samples=3, noise=NOISE, seed=1)


def _close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=1e-4)


def test_corruption_changes_the_output(tiny_model, runs):
    # otherwise every test below would pass trivially
    assert abs(runs.high - runs.low) > 1e-7
    n_pos = len(runs.prompt.ids)
    assert runs.clean_pre.shape == (tiny_model.cfg.n_layers + 1, n_pos, tiny_model.cfg.d_model)
    assert runs.corrupt_pre.shape[1] == 3


def test_restoring_every_position_of_a_layer_gives_the_clean_score(tiny_model, runs):
    n_pos = len(runs.prompt.ids)
    for layer in range(tiny_model.cfg.n_layers):
        p = patched_score(tiny_model, runs, [(t, layer) for t in range(n_pos)])
        assert _close(p, runs.high, tol=1e-6), (layer, p, runs.high)


def test_restoring_nothing_gives_the_corrupted_score(tiny_model, runs):
    assert _close(patched_score(tiny_model, runs, []), runs.low)


def test_tokens_before_the_subject_score_low(tiny_model, runs):
    scores = restore_scores(tiny_model, runs, kind="resid")
    a, _ = runs.prompt.subject
    assert torch.allclose(scores[:a], torch.full_like(scores[:a], runs.low))
    # restoring the last token's final state gives back the clean score
    assert _close(scores[-1, -1], runs.high)


@pytest.mark.parametrize("kind,window,severed", [("resid", 10, None), ("mlp", 2, None), ("attn", 1, None), ("mlp", 10, None), ("resid", 10, "mlp"), ("resid", 10, "attn")])
def test_batched_matches_reference(tiny_model, runs, kind, window, severed):
    fast = restore_scores(tiny_model, runs, kind=kind, window=window, severed=severed, batch_size=5)
    slow = reference_scores(tiny_model, runs, kind=kind, window=window, severed=severed)
    assert fast.shape == slow.shape == (len(runs.prompt.ids), tiny_model.cfg.n_layers)
    assert (fast - slow).abs().max() < 1e-6
    assert fast.std() > 0  # not a constant table


def _logit_gap(logits):
    return logits[:, -1, 5] - logits[:, -1, 7]  # O(1) on the tiny models, unlike their probabilities


@pytest.mark.parametrize("arch", ["tiny", "llama", "gemma3"])
@pytest.mark.parametrize("kind,severed", [("resid", None), ("mlp", None), ("attn", None), ("resid", "mlp"), ("resid", "attn")])
def test_prefix_cache_path_matches_full_positions(tiny_model, tokenizer, arch, kind, severed, monkeypatch):
    # both APIs resume from the corrupted run's keys/values and compute only the positions
    # from the restored token on (a 4.x bridge also skips the blocks before the start layer);
    # every cell equals the plain path's (all positions, every block run)
    from dataclasses import replace

    import tracer.model as tm
    from tests.tracer.test_model import _arch_model

    model = _arch_model(arch, tiny_model, tokenizer)
    runs = prepare_runs(model, PROMPT, SUBJECT, samples=3, noise=NOISE, seed=1)
    assert runs.corrupt_kv is not None
    kw = dict(kind=kind, window=3, severed=severed, metric=_logit_gap)
    fast = restore_scores(model, runs, batch_size=7, **kw)
    fast_p = restore_scores(model, runs, batch_size=7, kind=kind, window=3, severed=severed)
    monkeypatch.setitem(tm._FAST, model, (False, False))  # the bridge's own start_at_layer
    full = restore_scores(model, replace(runs, corrupt_kv=None), **kw)
    full_p = restore_scores(model, replace(runs, corrupt_kv=None), kind=kind, window=3, severed=severed)
    assert (fast - full).abs().max() < 1e-6
    assert (fast_p - full_p).abs().max() < 1e-6
    assert fast.std() > 1e-4  # not a constant table


def test_batch_size_does_not_change_scores(tiny_model, runs):
    a = restore_scores(tiny_model, runs, kind="mlp", window=2, batch_size=4)
    b = restore_scores(tiny_model, runs, kind="mlp", window=2, batch_size=1000)
    assert (a - b).abs().max() < 1e-6


def test_restricting_tokens_traces_only_those(tiny_model, runs):
    full = restore_scores(tiny_model, runs, kind="attn", window=2)
    last_subject = runs.prompt.subject[1] - 1
    part = restore_scores(tiny_model, runs, kind="attn", window=2, tokens=[0, last_subject])
    assert torch.allclose(part[last_subject], full[last_subject], atol=1e-7)
    assert torch.allclose(part[0], full[0])  # before the subject: low, without running
    others = [t for t in range(full.shape[0]) if t not in (0, last_subject)]
    assert torch.isnan(part[others]).all()
    with pytest.raises(ValueError, match="tokens"):
        restore_scores(tiny_model, runs, tokens=[99])


def test_window_larger_than_model_covers_all_layers(tiny_model, runs):
    n = tiny_model.cfg.n_layers
    for layer in range(n):
        assert window_layers(layer, 100, n) == range(0, n)
    scores = restore_scores(tiny_model, runs, kind="mlp", window=100)
    every = torch.tensor([patched_score(tiny_model, runs, [(t, L) for L in range(n)], kind="mlp") for t in range(scores.shape[0])])
    for layer in range(n):  # every centre restores the same (whole-model) window
        assert torch.allclose(scores[:, layer], every, atol=1e-6)


def test_window_formula_matches_the_paper():
    assert window_layers(0, 10, 18) == range(0, 5)
    assert window_layers(9, 10, 18) == range(4, 14)
    assert window_layers(17, 10, 18) == range(12, 18)
    assert window_layers(5, 1, 18) == range(5, 6)
    assert window_layers(5, 3, 18) == range(4, 7)


def test_severing_freezes_only_later_layers(tiny_model, runs):
    # the paper freezes the sublayer at every layer; layers <= the restored one are upstream, so no-op
    n = tiny_model.cfg.n_layers
    t = runs.prompt.subject[1] - 1
    for layer in range(n):
        all_layers = patched_score(tiny_model, runs, [(t, layer)], frozen=[(t, L) for L in range(n)], frozen_kind="mlp")
        later = patched_score(tiny_model, runs, [(t, layer)], frozen=[(t, L) for L in range(layer + 1, n)], frozen_kind="mlp")
        assert _close(all_layers, later, tol=1e-7)


def test_same_seed_same_result_other_seed_differs(tiny_model):
    a = trace_prompt(tiny_model, PROMPT, SUBJECT, samples=2, noise=NOISE, seed=3)
    b = trace_prompt(tiny_model, PROMPT, SUBJECT, samples=2, noise=NOISE, seed=3)
    c = trace_prompt(tiny_model, PROMPT, SUBJECT, samples=2, noise=NOISE, seed=4)
    assert torch.equal(a.scores, b.scores) and a.low == b.low
    assert not torch.equal(a.scores, c.scores)


def test_trace_result_metadata(tiny_model):
    res = trace_prompt(tiny_model, PROMPT, SUBJECT, kind="attn", window=2, samples=2, noise=NOISE, target="Paris")
    assert res.kind == "attn" and res.window == 2 and res.samples == 2
    assert res.target_id == target_ids(tiny_model, PROMPT, "Paris")[0]
    assert res.subject == (2, 6)
    assert torch.allclose(res.indirect_effect(), res.scores - res.low)
    d = res.to_dict()
    import json

    assert json.loads(json.dumps(d))["kind"] == "attn"
    back = type(res).from_dict(d)
    assert torch.allclose(back.scores, res.scores)


def test_trace_all_shares_runs(tiny_model):
    out = trace_all(tiny_model, PROMPT, SUBJECT, samples=2, noise=NOISE, window=2)
    assert set(out) == {"resid", "mlp", "attn"}
    assert len({r.low for r in out.values()}) == 1


def test_corrupted_prompt_mode(tiny_model):
    res = trace_prompt(tiny_model, PROMPT, SUBJECT, corrupted_prompt="The Louvre Rome is located in the city of", kind="resid")
    assert res.samples == 1 and res.noise_std is None
    # restoring the last token's last state recovers the clean run
    assert abs(float(res.scores[-1, -1]) - res.high) < 1e-5
    assert torch.allclose(res.scores[:1], torch.full_like(res.scores[:1], res.low))  # "The" is shared


def test_corrupted_prompt_of_other_length_raises(tiny_model):
    with pytest.raises(ValueError, match="corrupted_prompt"):
        trace_prompt(tiny_model, PROMPT, SUBJECT, corrupted_prompt="Paris")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(subject="Louvre"), "not found"),
        (dict(kind="embed"), "kind 'embed'"),
        (dict(window=0), "window 0"),
        (dict(samples=0), "samples 0"),
        (dict(prompt=""), "prompt ''"),
        (dict(severed="resid"), "severed 'resid'"),
        (dict(severed="mlp", kind="mlp"), "needs kind 'resid'"),
        (dict(noise=-1.0), "noise -1.0"),
        (dict(batch_size=0), "batch_size 0"),
    ],
)
def test_bad_input_raises_clear_value_error(tiny_model, kwargs, match):
    args = dict(prompt=PROMPT, subject=SUBJECT, noise=NOISE, samples=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        trace_prompt(tiny_model, args.pop("prompt"), args.pop("subject"), **args)


# --- Gemma-3-270m ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eiffel_mlp(gemma):
    # two noise samples keep this to about a minute on a shared 2-core CPU
    return trace_prompt(gemma, PROMPT, SUBJECT, kind="mlp", samples=2)


@pytest.mark.integration
def test_gemma_eiffel_high_well_above_low(eiffel_mlp):
    res = eiffel_mlp
    assert res.target.strip() == "Paris"
    assert res.high > 0.5
    assert res.high - res.low > 0.3


@pytest.mark.integration
def test_gemma_strongest_mlp_effect_is_inside_the_subject(eiffel_mlp):
    # Gemma-3-270m: the MLP effect sits on the subject, at "▁Eiffel" rather than the last subject
    # token "▁Tower" (measured with 10 samples: IE 0.44 at "▁Eiffel", 0.02 at "▁Tower"; see docs/tracing.md)
    res = eiffel_mlp
    per_token = res.indirect_effect().max(dim=1).values
    a, b = res.subject
    t_best = int(per_token.argmax())
    assert a <= t_best < b, (res.tokens, per_token)
    outside = torch.cat([per_token[:a], per_token[b:]])
    assert float(per_token[a:b].max()) > 3 * float(outside.max())
    # and it is an early-to-middle-layer effect, as in the paper
    assert int(res.indirect_effect()[t_best].argmax()) < res.scores.shape[1] // 2 + 1
