"""Padding and teacher-forced log-probs: the one module every batch goes through."""

import pytest
import torch

from tracer import encode, target_ids
from tracer.batching import pad_id, pad_left, pad_tokens, pick, position_log_probs, teacher_forced

PROMPTS = ["The Eiffel Tower is located in the city of", "Tokyo is the capital of"]
TARGETS = ["Paris", "Japan and Berlin"]


def test_pad_tokens_right_pads_with_the_pad_id(tiny_model):
    pad = tiny_model.tokenizer.pad_token_id or 0
    assert pad_id(tiny_model) == pad
    t = pad_tokens(tiny_model, [[5, 6, 7], [8]], "cpu")
    assert t.tolist() == [[5, 6, 7], [8, pad, pad]] and t.dtype == torch.long
    with pytest.raises(ValueError, match="empty"):
        pad_tokens(tiny_model, [], "cpu")


def test_pad_left_lines_up_the_last_tokens_with_a_mask(tiny_model):
    pad = pad_id(tiny_model)
    t, mask = pad_left(tiny_model, [[5, 6, 7], [8]], "cpu")
    assert t.tolist() == [[5, 6, 7], [pad, pad, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_pad_id_is_zero_without_a_pad_token():
    from types import SimpleNamespace

    model = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=None))  # only the tokenizer is read
    assert pad_id(model) == 0 and pad_tokens(model, [[5, 6], [7]], "cpu").tolist() == [[5, 6], [7, 0]]


def test_teacher_forced_layout():
    tf = teacher_forced([([1, 2, 3], [7, 8]), ([4], [9])])
    assert tf.seqs == ((1, 2, 3, 7, 8), (4, 9))
    assert (tf.rows, tf.cols, tf.targets, tf.lengths) == ((0, 0, 1), (2, 3, 0), (7, 8, 9), (2, 1))
    assert tf.split(["a", "b", "c"]) == [["a", "b"], ["c"]]
    short = teacher_forced([([1, 2, 3], [7, 8]), ([4], [9])], feed_last=False, first_row=5)
    assert short.seqs == ((1, 2, 3, 7), (4,)) and short.rows == (5, 5, 6) and short.cols == tf.cols
    with pytest.raises(ValueError, match="pair 1 has 1 prompt and 0 target tokens"):
        teacher_forced([([1], [2]), ([1], [])])


def test_position_log_probs_score_each_target_token_as_the_full_forward_does(tiny_model):
    pairs = [(encode(tiny_model, p), target_ids(tiny_model, p, t)) for p, t in zip(PROMPTS, TARGETS)]
    assert len(pairs[1][1]) > 1  # a multi-token target
    for feed_last in (True, False):
        tf = teacher_forced(pairs, feed_last=feed_last)
        with torch.no_grad():
            got = pick(position_log_probs(tiny_model, pad_tokens(tiny_model, tf.seqs, "cpu"), tf.rows_tensor(), tf.cols_tensor()),
                       tf.targets_tensor())
        for (p, t), seg in zip(pairs, tf.split(got)):
            with torch.no_grad():
                full = tiny_model(torch.tensor([p + t])).float().log_softmax(-1)[0]  # alone, unpadded
            want = torch.stack([full[len(p) - 1 + j, tid] for j, tid in enumerate(t)])
            torch.testing.assert_close(seg, want, rtol=1e-5, atol=1e-5)


def test_pick_takes_the_first_rows_only():
    lp = torch.arange(12.0).reshape(4, 3)
    assert pick(lp, [2, 0]).tolist() == [2.0, 3.0]
