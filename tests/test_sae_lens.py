"""sae-lens compatibility (TransformerLens 3.x; `romelens[sae]`): a `HookedSAETransformer`
with a small random SAE, built from a config (no download), passes through `trace_prompt`,
`compute`/`apply` and the CounterFact runner unchanged, and an SAE latent can be traced as
the metric (docs/interop.md, example (c)).

`add_sae` replaces the hook point it reads by a wrapper, so the plain name stops being a hook
point; `tracer.hooks.resolve_hook` maps it to the wrapper's `hook_sae_output` (or its
`hook_sae_input`, for a state fed back in at `start_at_layer`)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sae_lens", reason="install romelens[sae] (TransformerLens 3.x) for the sae-lens tests")

from sae_lens import HookedSAETransformer, StandardSAEConfig  # noqa: E402
from sae_lens.saes.standard_sae import StandardSAE  # noqa: E402

from tests.conftest import FIXTURES, make_tiny_hooked  # noqa: E402
from tracer import corruption_hooks, restoration_hooks, trace_prompt  # noqa: E402
from tracer.hooks import resolve_hook  # noqa: E402
from tracer.model import prepare_model, run_until, weights_hash  # noqa: E402
from tracer.noise import NoiseScale  # noqa: E402
from tracer.prompts import locate_subject, target_ids  # noqa: E402
from tracer.trace import prepare_runs, reference_scores, restore_scores, window_layers  # noqa: E402

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"
NOISE = NoiseScale(value=3.0)
S = 3
LATENT_HOOK = "blocks.1.hook_resid_post.hook_sae_acts_post"


def random_sae(hook: str, d_in: int = 32, d_sae: int = 64, seed: int = 0) -> StandardSAE:
    """A StandardSAE with random weights large enough that its reconstruction is far from identity."""
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    sae.cfg.metadata.hook_name = hook
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return sae


def sae_model(tokenizer, hook: str | None, *, use_error_term: bool = False):
    """A HookedSAETransformer with the tiny test model's weights, and an SAE at `hook`."""
    plain = make_tiny_hooked(tokenizer)
    model = HookedSAETransformer(plain.cfg, tokenizer=tokenizer)
    model.load_state_dict(plain.state_dict())
    if hook is not None:
        model.add_sae(random_sae(hook), use_error_term=use_error_term)
    return prepare_model(model), prepare_model(plain)


HOOKS = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.1.hook_mlp_out", "blocks.0.hook_attn_out"]


def test_an_attached_sae_hides_its_hook_point_and_resolve_finds_it(tokenizer):
    model, _ = sae_model(tokenizer, "blocks.1.hook_mlp_out")
    assert "blocks.1.hook_mlp_out" not in model.hook_dict  # why a plain hook name fails
    assert resolve_hook(model, "blocks.1.hook_mlp_out") == "blocks.1.hook_mlp_out.hook_sae_output"
    assert resolve_hook(model, "blocks.1.hook_mlp_out", side="input") == "blocks.1.hook_mlp_out.hook_sae_input"
    assert resolve_hook(model, "blocks.0.hook_mlp_out") == "blocks.0.hook_mlp_out"
    with pytest.raises(ValueError, match="side 'middle'"):
        resolve_hook(model, "blocks.0.hook_mlp_out", side="middle")


@pytest.mark.parametrize("hook", HOOKS)
def test_fast_trace_matches_the_plain_reference_with_an_sae_spliced_in(tokenizer, hook):
    model, plain = sae_model(tokenizer, hook)
    runs = prepare_runs(model, PROMPT, SUBJECT, samples=S, noise=NOISE, seed=1)
    plain_runs = prepare_runs(plain, PROMPT, SUBJECT, target=runs.target_id, samples=S, noise=NOISE, seed=1)
    assert abs(runs.high - plain_runs.high) > 1e-6  # the SAE (no error term) changes the model
    for kind, severed in [("resid", None), ("mlp", None), ("attn", None), ("resid", "mlp")]:
        fast = restore_scores(model, runs, kind=kind, window=2, severed=severed)
        slow = reference_scores(model, runs, kind=kind, window=2, severed=severed)
        assert (fast - slow).abs().max() < 1e-6, (kind, severed)


def test_with_the_error_term_the_trace_is_the_plain_models(tokenizer):
    model, plain = sae_model(tokenizer, "blocks.1.hook_resid_post", use_error_term=True)
    for kind in ("resid", "mlp"):
        a = trace_prompt(model, PROMPT, SUBJECT, kind=kind, window=2, samples=S, noise=NOISE, seed=1)
        b = trace_prompt(plain, PROMPT, SUBJECT, kind=kind, window=2, samples=S, noise=NOISE, seed=1)
        assert (a.scores - b.scores).abs().max() < 1e-5 and a.high == pytest.approx(b.high, abs=1e-6)


# --- docs/interop.md, example (c): which states restore an SAE latent ------------------------


def latent_metric(latent: int):
    """The SAE latent's activation at the last position: `[batch, 1, d_sae] -> [batch]`."""
    return lambda acts: acts[:, -1, latent]


@pytest.mark.parametrize("kind,window", [("resid", 1), ("mlp", 2), ("attn", 1)])
def test_sae_latent_trace_matches_corruption_and_restoration_hooks(tokenizer, kind, window):
    model, _ = sae_model(tokenizer, "blocks.1.hook_resid_post")
    pt = locate_subject(model, PROMPT, SUBJECT)
    tokens = pt.tensor()
    _, clean = model.run_with_cache(tokens)
    corrupt = corruption_hooks(model, tokens, pt.subject, noise=NOISE, samples=S, seed=1)
    with torch.no_grad(), model.hooks(fwd_hooks=corrupt):
        noised = run_until(model, tokens.expand(S, -1), LATENT_HOOK)[:, -1].mean(0)  # [d_sae]
    latent = int((clean[LATENT_HOOK][0, -1] - noised).argmax())  # the latent the corruption dims most
    fn = latent_metric(latent)
    res = trace_prompt(model, PROMPT, SUBJECT, kind=kind, window=window, samples=S, noise=NOISE, seed=1,
                       metric=fn, metric_at=LATENT_HOOK)
    assert res.high == pytest.approx(float(clean[LATENT_HOOK][0, -1, latent]), abs=1e-5)
    n = model.cfg.n_layers
    for t in range(len(pt.ids)):
        for layer in range(n):
            layers = [layer] if kind == "resid" else window_layers(layer, window, n)
            with torch.no_grad(), model.hooks(fwd_hooks=corrupt + restoration_hooks(clean, kind=kind, positions=t, layers=layers)):
                want = float(fn(run_until(model, tokens.expand(S, -1), LATENT_HOOK)).mean())
            assert float(res.scores[t, layer]) == pytest.approx(want, abs=1e-5), (t, layer)
    # some restored state brings the feature back; states after its block (resid, layer >= 1) cannot
    assert float(res.scores.max()) - res.low > 0.5 * (res.high - res.low) > 0
    if kind == "resid":
        assert torch.equal(res.scores[:, 1:], torch.full_like(res.scores[:, 1:], res.low))


def test_metric_at_bad_input(tokenizer):
    model, _ = sae_model(tokenizer, "blocks.1.hook_resid_post")
    with pytest.raises(ValueError, match="metric_at 'blocks.1.hook_nothing' is not a hook point"):
        trace_prompt(model, PROMPT, SUBJECT, samples=S, metric=latent_metric(0), metric_at="blocks.1.hook_nothing")
    with pytest.raises(ValueError, match="needs a metric"):
        trace_prompt(model, PROMPT, SUBJECT, samples=S, metric_at=LATENT_HOOK)
    with pytest.raises(ValueError, match="non-finite"):
        trace_prompt(model, PROMPT, SUBJECT, samples=S, metric=lambda a: a[:, -1, 0] * float("nan"), metric_at=LATENT_HOOK)


# --- edits and the benchmark runner on a HookedSAETransformer ---------------------------------


def test_rome_compute_apply_restore_on_an_sae_model(tokenizer, tmp_path):
    from editor import ROMEHParams, rome
    from editor.common import probe
    from tests.editor.test_edit import REQ

    model, _ = sae_model(tokenizer, "blocks.0.hook_resid_post")  # upstream of the edited layer 1
    hp = ROMEHParams(layer=1, v_lr=1.0, v_num_grad_steps=15, clamp_norm_factor=50.0, v_weight_decay=0.0,
                     kl_factor=0.0, context_lengths=((4, 2),))
    before = weights_hash(model)
    edit = rome.compute(model, [REQ], hp, stats=torch.eye(model.cfg.d_mlp), cache_dir=tmp_path)
    assert weights_hash(model) == before  # compute leaves the weights as they were
    applied = edit.apply(model)
    assert weights_hash(model) != before
    assert probe(model, [REQ])["new_first"][0] > 1.5 * edit.diagnostics["before"]["new_first"][0]
    applied.restore()
    assert weights_hash(model) == before


def test_counterfact_runner_on_an_sae_model(tokenizer, tmp_path):
    from benchmarks import runner
    from benchmarks.counterfact import evaluate_counterfact
    from benchmarks.data import load_counterfact
    from editor import ROMEHParams

    model, _ = sae_model(tokenizer, "blocks.0.hook_mlp_out")
    records = load_counterfact(FIXTURES / "counterfact_tiny.json")[:2]
    before = weights_hash(model)
    hp = ROMEHParams(layer=1, v_lr=1.0, v_num_grad_steps=15, clamp_norm_factor=50.0, v_weight_decay=0.0,
                     kl_factor=0.0, context_lengths=((4, 2),))
    rows = runner.run_records(model=model, method=runner.get_method("rome"), records=records, out_dir=tmp_path,
                              evaluate=lambda m, r: evaluate_counterfact(m, r, gen_tokens=0), hparams=hp,
                              edit_kwargs={"stats": torch.eye(model.cfg.d_mlp), "cache_dir": tmp_path})
    assert weights_hash(model) == before and len(rows) == 2
    assert all("error" not in r for r in rows), rows
    base = [evaluate_counterfact(model, r, gen_tokens=0) for r in records]
    # the edit moved the rewrite prompt's NLL of the new target down
    assert all(row["nll"]["rewrite"]["new"][0] < b["nll"]["rewrite"]["new"][0] for row, b in zip(rows, base))


def test_compute_warns_about_error_term_saes_after_the_edit_layer(tokenizer, tmp_path, caplog):
    from editor import ROMEHParams, rome
    from tests.editor.test_edit import REQ

    hp = ROMEHParams(layer=1, v_lr=1.0, v_num_grad_steps=2, clamp_norm_factor=50.0, v_weight_decay=0.0,
                     kl_factor=0.0, context_lengths=((4, 2),))
    for hook, error_term, warned in [("blocks.2.hook_resid_post", True, True), ("blocks.0.hook_resid_post", True, False),
                                     ("blocks.2.hook_resid_post", False, False)]:
        model, _ = sae_model(tokenizer, hook, use_error_term=error_term)
        caplog.clear()
        with caplog.at_level("WARNING", logger="editor.checks"):
            rome.compute(model, [REQ], hp, stats=torch.eye(model.cfg.d_mlp), cache_dir=tmp_path)
        assert ("use_error_term=True are attached at ['blocks.2.hook_resid_post']" in caplog.text) == warned, (hook, error_term)

