"""`python -m editor` on the tiny model: before/after predictions, --save, weights restored."""

import torch

import tracer
from editor import __main__ as cli
from editor import apply_saved, hparams
from tracer.model import w_out


def test_cli_prints_before_after_saves_and_restores(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tracer, "load_model", lambda *a, **k: tiny_model)
    monkeypatch.setattr(hparams, "default_layer", lambda model: 1)  # no preset for the tiny model: skip tracing
    w0 = [w_out(tiny_model, l).detach().clone() for l in range(tiny_model.cfg.n_layers)]
    out = tmp_path / "edit.safetensors"
    rc = cli.main(["--model", "tiny", "--method", "ft-l", "--prompt", "The capital city of {}", "--subject", "France",
                   "--new", "Rome", "--neighbor", "The Eiffel Tower is", "--layer", "1", "--save", str(out)])
    assert rc == 0
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
