"""Integration: ROME on the real offline Gemma-3-270m (Eiffel Tower -> Rome), and exact undo."""

import pytest
import torch

from editor import EditRequest, rome
from editor.stats import layer_stats
from tracer import target_probs
from tracer.model import final_logits, final_resid, w_out
from tracer.prompts import encode

pytestmark = pytest.mark.integration

PROMPT = "The Eiffel Tower is located in the city of"
PARAPHRASE = "Here is a fact about a famous place. The Eiffel Tower is located in the city of"
NEIGHBOR = "The Louvre is located in the city of"
STATS_TOKENS = 20_000  # a small covariance keeps the test short; the preset uses 100k


def top1(model, prompt):
    ids = torch.tensor([encode(model, prompt)])
    with torch.no_grad():
        return model.tokenizer.decode([int(final_logits(model, final_resid(model, ids)[0, -1]).argmax())])


def logits(model, prompt):
    with torch.no_grad():
        return final_logits(model, final_resid(model, torch.tensor([encode(model, prompt)])))


@pytest.fixture(scope="module")
def stats_and_cache(gemma, shared_data, tmp_path_factory):
    cache = tmp_path_factory.mktemp("romelens-cache")
    hp = rome.rome_hparams(gemma)
    C = layer_stats(gemma, hp.layer, corpus=str(shared_data / "wikitext-2-raw-test.txt"), n_tokens=STATS_TOKENS,
                    cache_dir=cache, progress=False)
    return C, cache


def test_eiffel_to_rome_and_exact_restore(gemma, stats_and_cache):
    C, cache = stats_and_cache
    assert top1(gemma, PROMPT).strip() == "Paris"
    before = {p: logits(gemma, p) for p in (PROMPT, NEIGHBOR)}
    w0 = [w_out(gemma, l).detach().clone() for l in range(gemma.cfg.n_layers)]
    req = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome", target_true="Paris")
    with rome.edit(gemma, req, stats=C, cache_dir=cache) as e:
        assert top1(gemma, PROMPT).strip() == "Rome"
        assert top1(gemma, PARAPHRASE).strip() == "Rome"
        assert top1(gemma, NEIGHBOR).strip() == "Paris"
        p = target_probs(gemma, [PROMPT, NEIGHBOR, NEIGHBOR], ["Rome", "Paris", "Rome"]).first
        # measured at the preset layer 4 (20k-token statistics): p(Rome) 0.98 on the prompt; the
        # Louvre keeps Paris first at 0.21 (unedited 0.49), above Rome
        assert p[0] > 0.5 and p[1] > 0.15 and p[1] > p[2]
        assert e.diagnostics["after"]["true_first"][0] < e.diagnostics["before"]["true_first"][0]
    assert all(torch.equal(w_out(gemma, l), w0[l]) for l in range(gemma.cfg.n_layers))
    for prompt, lg in before.items():
        assert torch.equal(logits(gemma, prompt), lg)


def test_memit_joint_spread_edits_a_batch_and_every_layer_helps(gemma, shared_data, tmp_path):
    from editor import memit

    hp = memit.memit_hparams(gemma)
    assert hp.spread == "joint"
    stats = layer_stats(gemma, list(hp.layers), corpus=str(shared_data / "wikitext-2-raw-test.txt"),
                        n_tokens=STATS_TOKENS, cache_dir=tmp_path, progress=False)
    reqs = [
        EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome", target_true="Paris"),
        EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English", target_true="French"),
        EditRequest(prompt="{} is a professional", subject="Michael Jordan", target_new="soccer", target_true="basketball"),
    ]
    w0 = [w_out(gemma, l).detach().clone() for l in range(gemma.cfg.n_layers)]
    with memit.edit_many(gemma, reqs, hp, stats=stats, cache_dir=tmp_path) as e:
        after = e.diagnostics["after"]
        assert (after["new_seq"] > after["true_seq"]).all(), after  # every edit wins on its prompt
        # the layers below the last move the residual toward z: measured here |z - h| 1352, 1164,
        # 921, 935, 703 before layers 2-6 and 164 after. With the paper's equal residual shares
        # on Gemma it stayed at 0.86-0.93 of its start before the last layer (docs/editing.md)
        dist = [i["resid_norm"] for i in e.diagnostics["layers"]] + [e.diagnostics["layers"][-1]["resid_norm_after"]]
        assert dist[-2] < 0.7 * dist[0] and dist[-1] < 0.25 * dist[0], dist
    assert all(torch.equal(w_out(gemma, l), w0[l]) for l in range(gemma.cfg.n_layers))


def test_alphaedit_two_sequential_batches_all_win_and_restore_exactly(gemma, shared_data, tmp_path):
    from editor import alphaedit

    hp = alphaedit.alphaedit_hparams(gemma)
    stats = layer_stats(gemma, list(hp.layers), corpus=str(shared_data / "wikitext-2-raw-test.txt"),
                        n_tokens=STATS_TOKENS, cache_dir=tmp_path, progress=False)
    batches = [
        [EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome", target_true="Paris"),
         EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English", target_true="French"),
         EditRequest(prompt="{} is a professional", subject="Michael Jordan", target_new="soccer", target_true="basketball")],
        [EditRequest(prompt="{} is located in the country of", subject="The Colosseum", target_new="Japan", target_true="Italy"),
         EditRequest(prompt="{} was founded by", subject="Apple", target_new="Bill Gates", target_true="Steve Jobs"),
         EditRequest(prompt="The capital of {} is", subject="Germany", target_new="Vienna", target_true="Berlin")],
    ]
    w0 = [w_out(gemma, l).detach().clone() for l in range(gemma.cfg.n_layers)]
    seq, applied = alphaedit.AlphaEditSequence(), []
    try:
        for batch in batches:
            e = alphaedit.compute(gemma, batch, hp, stats=stats, cache_dir=tmp_path, sequence=seq)
            assert all(i["rank"] > 0 for i in e.diagnostics["nullspace"].values())
            applied.append(e.apply(gemma))
            seq.record(gemma, e)
        from editor.common import probe

        p = probe(gemma, batches[0] + batches[1])
        assert (p["new_seq"] > p["true_seq"]).all(), p  # every edit of both batches wins after the second batch
    finally:
        for a in reversed(applied):
            a.restore()
    assert all(torch.equal(w_out(gemma, l), w0[l]) for l in range(gemma.cfg.n_layers))
