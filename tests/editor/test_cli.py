"""`python -m editor` on the tiny model: before/after predictions, --save, weights restored;
the model options every command shares (--model PATH, --model-loader); an explicit layer
never runs the causal-tracing layer choice."""

import argparse

import pytest
import torch

import tracer.layer
import tracer.model
from editor import __main__ as cli
from editor import METHODS, apply_saved
from tracer.model import w_out


@pytest.fixture
def no_tracing(monkeypatch, tmp_path):
    """Fail if anything chooses the edit layer by causal tracing (with an empty cache, so no
    cached choice can hide a call)."""
    monkeypatch.setenv("ROMELENS_CACHE", str(tmp_path / "no-tracing-cache"))
    calls = []

    def traced(*a, **k):
        calls.append(a)
        raise AssertionError("the edit layer was chosen by causal tracing despite an explicit layer")

    monkeypatch.setattr(tracer.layer, "choose_edit_layer", traced)
    return calls


def test_cli_prints_before_after_saves_and_restores(tiny_model, tmp_path, monkeypatch, capsys, no_tracing):
    monkeypatch.setattr(tracer.model, "load_model", lambda *a, **k: tiny_model)
    monkeypatch.setenv("ROMELENS_CACHE", str(tmp_path / "cache"))
    w0 = [w_out(tiny_model, l).detach().clone() for l in range(tiny_model.cfg.n_layers)]
    out = tmp_path / "edit.safetensors"
    rc = cli.main(["--model", "tiny", "--method", "ft-l", "--prompt", "The capital city of {}", "--subject", "France",
                   "--new", "Rome", "--neighbor", "The Eiffel Tower is", "--layer", "1", "--save", str(out)])
    assert rc == 0 and no_tracing == []  # --layer: no preset needed, no tracing
    text = capsys.readouterr().out
    assert "ft-l edit of tiny: 'The capital city of France' -> 'Rome' (layers [1])" in text
    for part in ("[prompt] The capital city of France", "[paraphrase]", "[neighbor] The Eiffel Tower is"):
        assert part in text
    assert text.count("before:") == 3 and text.count("after:") == 3
    assert all(torch.equal(w_out(tiny_model, l), w) for l, w in enumerate(w0))  # restored after printing
    e = apply_saved(tiny_model, out)  # the saved edit re-applies to the same model
    assert not torch.equal(w_out(tiny_model, 1), w0[1])
    e.restore()
    assert torch.equal(w_out(tiny_model, 1), w0[1])


def test_cli_edits_a_local_hf_folder_and_a_loader_hook(tokenizer, tmp_path, monkeypatch, capsys, no_tracing):
    from tests.tracer.hf_tiny import save_folder, tiny_llama

    monkeypatch.setenv("ROMELENS_CACHE", str(tmp_path / "cache"))
    folder = save_folder(tiny_llama(tokenizer), tokenizer, tmp_path / "my-llama")
    args = ["--method", "ft-l", "--prompt", "The capital city of {}", "--subject", "France", "--new", "Rome", "--layer", "0"]
    assert cli.main(["--model", str(folder), *args]) == 0
    assert f"ft-l edit of {folder}:" in capsys.readouterr().out
    (tmp_path / "hook_mod.py").write_text(
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "def load(spec):\n    return AutoModelForCausalLM.from_pretrained(spec), AutoTokenizer.from_pretrained(spec)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main(["--model", str(folder), "--model-loader", "hook_mod:load", *args]) == 0
    assert "(layers [0])" in capsys.readouterr().out


@pytest.mark.parametrize("method,layer,expect", [("rome", 1, ("layer", 1)), ("ft-l", 2, ("layer", 2)), ("memit", 2, ("layers", (0, 1, 2)))])
def test_explicit_layer_builds_hparams_without_tracing(tiny_model, no_tracing, method, layer, expect):
    hp = METHODS[method].hparams_for(tiny_model, layer=layer)
    assert getattr(hp, expect[0]) == expect[1] and no_tracing == []


def test_benchmark_layer_override_skips_tracing(tiny_model, no_tracing):
    from benchmarks.runner import method_hparams

    assert method_hparams(METHODS["rome"], tiny_model, ["layer=1", "v_lr=0.1"]).layer == 1
    assert method_hparams(METHODS["memit"], tiny_model, ["layers=[1, 2]"]).layers == (1, 2)
    assert method_hparams(METHODS["ft-l"], tiny_model, ["layer=0"]).layer == 0
    assert no_tracing == []


def test_every_command_takes_the_same_model_options(capsys):
    from benchmarks.runner import add_common_args
    from tracer.__main__ import _parser as tracer_parser

    bench = argparse.ArgumentParser()
    add_common_args(bench)
    parsed = [
        bench.parse_args(["--out", "x", "--model", "m", "--model-loader", "pkg.mod:load"]),
        tracer_parser().parse_args(["--model", "m", "--model-loader", "pkg.mod:load"]),
    ]
    assert all((a.model, a.model_loader) == ("m", "pkg.mod:load") for a in parsed)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    helps = [" ".join(h.split()) for h in (capsys.readouterr().out, bench.format_help(), tracer_parser().format_help())]
    assert all("--model-loader MODULE:FUNCTION" in h and "local Hugging Face model folder" in h for h in helps)
