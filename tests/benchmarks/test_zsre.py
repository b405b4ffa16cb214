"""zsRE token accuracy on the tiny model against a one-prefix-at-a-time reference."""

import pytest
import torch

import tracer
from benchmarks import zsre
from benchmarks.data import load_zsre
from benchmarks.metrics import teacher_forced_correct
from tests.conftest import FIXTURES
from tracer import encode, target_ids


def _slow_correct(model, prompt, target):
    ids, out = encode(model, prompt), []
    for t in target_ids(model, prompt, target):
        out.append(int(model(torch.tensor([ids]))[0, -1].argmax()) == t)
        ids = ids + [t]
    return out


def test_teacher_forced_matches_prefix_by_prefix(tiny_model):
    prompts = ["The capital of France is", "Michael Jordan plays the sport of", "Tokyo is"]
    targets = ["Paris and Rome", "basketball", "the capital of Japan"]
    assert teacher_forced_correct(tiny_model, prompts, targets) == [
        _slow_correct(tiny_model, p, t) for p, t in zip(prompts, targets)
    ]


def test_teacher_forced_can_be_all_correct(tiny_model):
    # make the target the model's own greedy continuation: accuracy must be 1
    prompt = "The Eiffel Tower is"
    ids = encode(tiny_model, prompt)
    cont = []
    for _ in range(3):
        nxt = int(tiny_model(torch.tensor([ids + cont]))[0, -1].argmax())
        cont.append(nxt)
    assert teacher_forced_correct(tiny_model, [prompt], [cont]) == [[True, True, True]]


def test_evaluate_zsre(tiny_model):
    rec = load_zsre(FIXTURES / "zsre_tiny.json")[0]
    row = zsre.evaluate_zsre(tiny_model, rec)
    assert row["hits"][0] == _slow_correct(tiny_model, rec.rewrite_prompt, rec.target_new)
    assert row["specificity"] == pytest.approx(sum(row["hits"][2]) / len(row["hits"][2]))


def test_zsre_cli(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(tracer, "load_model", lambda *a, **k: tiny_model)
    s = zsre.main(["--method", "none", "--n", "3", "--out", str(tmp_path / "z"), "--data",
                   str(FIXTURES / "zsre_tiny.json"), "--ppl-tokens", "0"])
    assert set(s["columns"]) == {"Efficacy", "Paraphrase", "Specificity"}
    assert s["records_evaluated"] == 3 and s["perplexity"]["before"] is None


def test_zsre_cli_sequential(tiny_model, tmp_path, monkeypatch):
    from benchmarks import runner
    from tracer import weights_hash

    monkeypatch.setattr(tracer, "load_model", lambda *a, **k: tiny_model)
    monkeypatch.setattr(runner, "edit_kwargs", lambda args: {"stats": torch.eye(tiny_model.cfg.d_mlp),
                                                            "cache_dir": tmp_path / "cache"})
    before = weights_hash(tiny_model)
    out = tmp_path / "zs"
    s = zsre.main(["--method", "rome", "--sequential", "--batch", "2", "--n", "3", "--out", str(out), "--data",
                   str(FIXTURES / "zsre_tiny.json"), "--ppl-tokens", "0", "--hparam", "layer=1",
                   "--hparam", "v_num_grad_steps=3"])
    assert s["sequential"]["batch"] == 2 and s["sequential"]["checkpoints"] == 2 and s["records_evaluated"] == 3
    assert s["model_restored"] and weights_hash(tiny_model) == before
    assert (out / "collapse.html").exists() and (out / "edits" / "batch_00001.safetensors").exists()
