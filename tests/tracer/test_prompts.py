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


@pytest.mark.parametrize("prompt,target", [(PROMPT + " ", "Paris"), (PROMPT + "  ", "Paris"), (PROMPT + " ", " Paris")])
def test_trailing_space_is_scored_as_the_text_tokenizes(tiny_model, prompt, target):
    """"... of " + "Paris" is the text "... of Paris": tokens [..., "Ġof", "ĠParis"], never a
    lone "Ġ" followed by a space-less "Paris"."""
    assert encode(tiny_model, prompt) == encode(tiny_model, PROMPT)
    assert tiny_model.tokenizer.convert_ids_to_tokens(target_ids(tiny_model, prompt, target)) == ["ĠParis"]
    assert locate_subject(tiny_model, prompt, "Eiffel Tower").ids == locate_subject(tiny_model, PROMPT, "Eiffel Tower").ids
    got = target_probs(tiny_model, [prompt, PROMPT], [target, "Paris"])
    assert got.first[0] == got.first[1] and got.seq[0] == got.seq[1]


def test_newline_boundary_is_kept(tiny_model):
    tok = tiny_model.tokenizer
    assert target_ids(tiny_model, "Q: capital of France?\n", "Paris") == tok("\nParis", add_special_tokens=False)["input_ids"][1:]
    assert encode(tiny_model, "Q: capital of France?\n")[-1] == tok("\n", add_special_tokens=False)["input_ids"][-1]


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



@pytest.mark.parametrize("bad", [lambda v: v, lambda v: -1, lambda v: [7, v], lambda v: [7, -2], lambda v: 3.0,
                                 lambda v: [7, 8.0], lambda v: True, lambda v: torch.tensor([[7]])],
                         ids=["d_vocab", "-1", "list-d_vocab", "list-neg", "float", "list-float", "bool", "2d-tensor"])
def test_token_ids_outside_the_vocabulary_are_refused_everywhere(tiny_model, bad):
    from tracer.trace import trace_prompt

    d_vocab = tiny_model.cfg.d_vocab
    bad = bad(d_vocab)  # d_vocab itself, negative ids (which would wrap), floats, bools, a 2-d tensor
    for call in (lambda: target_ids(tiny_model, PROMPT, bad),
                 lambda: target_probs(tiny_model, [PROMPT], [bad])):
        with pytest.raises(ValueError, match=r"target.*(outside the vocabulary: expected 0 <= id < d_vocab|must be)"):
            call()
    if isinstance(bad, int) and not isinstance(bad, bool):  # trace_prompt takes one id; refused, not wrapped or an IndexError
        with pytest.raises(ValueError, match=rf"target token id {bad} is outside the vocabulary.*d_vocab {d_vocab}"):
            trace_prompt(tiny_model, PROMPT, "Eiffel Tower", target=bad, samples=2)


def test_token_ids_of_other_integer_types_are_taken(tiny_model):
    import numpy as np

    last = tiny_model.cfg.d_vocab - 1
    assert target_ids(tiny_model, PROMPT, np.int64(7)) == [7]
    assert target_ids(tiny_model, PROMPT, torch.tensor(7)) == [7]
    assert target_ids(tiny_model, PROMPT, torch.tensor([7, last])) == [7, last]
    assert target_ids(tiny_model, PROMPT, (7, np.int32(8))) == [7, 8]


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


def test_prompts_longer_than_the_context_raise_before_the_forward_pass(tiny_model):
    from benchmarks.metrics import greedy_generate
    from tracer import trace_prompt

    n_ctx = tiny_model.cfg.n_ctx
    long = "The Eiffel Tower is " + "very " * n_ctx + "tall"
    for call in (
        lambda: encode(tiny_model, long),
        lambda: locate_subject(tiny_model, long, "Eiffel Tower"),
        lambda: target_probs(tiny_model, [long], ["Paris"]),
        lambda: trace_prompt(tiny_model, long, "Eiffel Tower", kind="mlp", samples=1),
        lambda: greedy_generate(tiny_model, [long], max_new_tokens=3),
    ):
        with pytest.raises(ValueError, match=rf"prompt 'The Eiffel Tower is very.*' is \d+ tokens long .*n_ctx={n_ctx}"):
            call()
    # prompt and target fit alone but not together: the scored sequence is refused
    short = "The Eiffel Tower is"
    while len(encode(tiny_model, short + " city")) <= n_ctx - 2:
        short += " city"
    assert len(encode(tiny_model, short)) == n_ctx - 2
    with pytest.raises(ValueError, match=rf"with target 'Paris and Rome and Tokyo.*n_ctx={n_ctx}"):
        target_probs(tiny_model, [short], ["Paris and Rome and Tokyo and Berlin and London"])
