"""Subject location, target tokenization and target probabilities on a tiny model."""

import pytest
import torch

from tracer import encode, locate_subject, target_ids, target_probs

PROMPT = "The Eiffel Tower is located in the city of"


def test_subject_with_bpe_leading_space(tiny_model):
    p = locate_subject(tiny_model, PROMPT, "Eiffel Tower")
    # BOS, "The", then the subject tokens carry the leading space marker.
    assert p.tokens[0] == tiny_model.tokenizer.bos_token
    assert p.subject[0] == 2
    assert "".join(p.subject_tokens).replace("Ġ", " ").strip() == "Eiffel Tower"
    assert p.subject_tokens[0].startswith("Ġ")
    assert p.last_subject == p.subject[1] - 1
    assert list(p.ids) == encode(tiny_model, PROMPT)


def test_subject_at_start_of_prompt(tiny_model):
    p = locate_subject(tiny_model, "Eiffel Tower is located in the city of", "Eiffel Tower")
    assert p.subject[0] == 1  # right after BOS
    assert "".join(p.subject_tokens).replace("Ġ", " ") == "Eiffel Tower"


def test_template_placeholder_is_filled(tiny_model):
    p = locate_subject(tiny_model, "{} is located in the city of", "Eiffel Tower")
    q = locate_subject(tiny_model, "Eiffel Tower is located in the city of", "Eiffel Tower")
    assert p.prompt == q.prompt and p.subject == q.subject and p.ids == q.ids


def test_repeated_subject_takes_last_occurrence(tiny_model):
    prompt = "Paris is a city and Paris"
    p = locate_subject(tiny_model, prompt, "Paris")
    assert p.subject[1] == len(p.ids)  # the second "Paris" ends the prompt
    assert p.subject[0] > 1


def test_missing_subject_names_both(tiny_model):
    with pytest.raises(ValueError, match=r"subject 'Eiffel Tower' not found in prompt 'The Louvre is in'"):
        locate_subject(tiny_model, "The Louvre is in", "Eiffel Tower")


@pytest.mark.parametrize("prompt,subject", [("", "x"), ("   ", "x"), ("The city of", ""), ("The city", "  ")])
def test_empty_inputs_rejected(tiny_model, prompt, subject):
    with pytest.raises(ValueError, match="empty"):
        locate_subject(tiny_model, prompt, subject)


def test_target_gets_leading_space(tiny_model):
    tok = tiny_model.tokenizer
    ids = target_ids(tiny_model, PROMPT, "Paris")
    assert tok.convert_ids_to_tokens(ids) == ["ĠParis"]
    assert target_ids(tiny_model, PROMPT, " Paris") == ids
    assert target_ids(tiny_model, PROMPT + " ", "Paris") != ids  # the prompt already has the space


def test_multi_token_target_and_ids(tiny_model):
    ids = target_ids(tiny_model, PROMPT, "Rome and Tokyo")
    assert len(ids) >= 3
    assert tiny_model.tokenizer.decode(ids) == " Rome and Tokyo"
    assert target_ids(tiny_model, PROMPT, 7) == [7]
    assert target_ids(tiny_model, PROMPT, [7, 8]) == [7, 8]
    with pytest.raises(ValueError, match="empty"):
        target_ids(tiny_model, PROMPT, "")
    with pytest.raises(ValueError, match="empty"):
        target_ids(tiny_model, PROMPT, [])


def test_target_probs_match_full_logits(tiny_model):
    targets = ["Paris", "Rome and Tokyo"]
    got = target_probs(tiny_model, [PROMPT, PROMPT], targets)
    for i, t in enumerate(targets):
        p_ids, t_ids = encode(tiny_model, PROMPT), target_ids(tiny_model, PROMPT, t)
        toks = torch.tensor([p_ids + t_ids])
        with torch.no_grad():
            lp = tiny_model(toks)[0].log_softmax(-1)
        steps = [lp[len(p_ids) - 1 + j, tid] for j, tid in enumerate(t_ids)]
        assert got.first[i] == pytest.approx(steps[0].exp().item(), rel=1e-4)
        assert got.seq[i] == pytest.approx(torch.stack(steps).sum().exp().item(), rel=1e-4)
        assert got.mean_nll[i] == pytest.approx(-torch.stack(steps).mean().item(), rel=1e-4)
        assert got.n_tokens[i] == len(t_ids)


def test_target_probs_do_not_depend_on_batching(tiny_model):
    prompts = [PROMPT, "The Louvre is located in", "Tokyo is the capital of"]
    targets = ["Paris", "the city of Paris", "Japan"]
    one = target_probs(tiny_model, prompts, targets, batch_size=1)
    all_ = target_probs(tiny_model, prompts, targets, batch_size=3)
    torch.testing.assert_close(one.seq, all_.seq, rtol=1e-5, atol=1e-7)


def test_target_probs_bad_lengths(tiny_model):
    with pytest.raises(ValueError, match="differ in length"):
        target_probs(tiny_model, [PROMPT], ["a", "b"])
