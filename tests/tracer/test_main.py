"""The command line (python -m tracer), on the tiny model."""

from __future__ import annotations

import json

import pytest

from tracer.__main__ import main


@pytest.fixture
def cli_model(tiny_model, monkeypatch, tmp_path):
    monkeypatch.setattr("tracer.model.load_model", lambda *a, **k: tiny_model)
    monkeypatch.setenv("ROMELENS_CACHE", str(tmp_path / "cache"))
    return tiny_model


def test_cli_single_prompt_all_kinds(cli_model, tmp_path, capsys):
    out = tmp_path / "trace.html"
    rc = main(["--prompt", "Tokyo is the capital of", "--subject", "Tokyo", "--kind", "all", "--samples", "1", "--window", "2", "--out", str(out), "--save-json", "-q"])
    assert rc == 0 and out.exists()
    data = json.loads(out.with_suffix(".json").read_text())
    assert [d["kind"] for d in data] == ["resid", "mlp", "attn"]
    text = capsys.readouterr().out
    assert "high (clean)" in text and "max indirect effect" in text


def test_cli_dataset_mode_prints_layer(cli_model, tmp_path, capsys):
    facts = tmp_path / "k.json"
    facts.write_text(json.dumps([{"known_id": 0, "prompt": "Tokyo is the capital of", "subject": "Tokyo", "attribute": None}, {"known_id": 1, "prompt": "Berlin is a city in", "subject": "Berlin", "attribute": None}]))
    rc = main(["--facts", str(facts), "--kinds", "mlp", "--samples", "1", "--window", "2", "--out", str(tmp_path / "run"), "-q"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "kept 2" in text and "chosen edit layer" in text
    assert (tmp_path / "run" / "summary.json").exists()


def test_cli_needs_prompt_and_subject_or_facts(capsys):
    with pytest.raises(SystemExit):
        main(["--prompt", "Tokyo is"])


def test_cli_traces_a_local_hf_folder(tokenizer, tmp_path, monkeypatch, capsys):
    from tests.tracer.hf_tiny import save_folder, tiny_gpt2

    monkeypatch.setenv("ROMELENS_CACHE", str(tmp_path / "cache"))
    folder = save_folder(tiny_gpt2(tokenizer), tokenizer, tmp_path / "my-gpt2")
    rc = main(["--model", str(folder), "--prompt", "Tokyo is the capital of", "--subject", "Tokyo", "--kind", "mlp", "--samples", "1", "--window", "1", "-q"])
    assert rc == 0 and "max indirect effect" in capsys.readouterr().out


def test_cli_dataset_choice_is_cached_for_the_editors(cli_model, tmp_path, capsys):
    from tracer.layer import cached_layer_choice

    facts = tmp_path / "k.json"
    facts.write_text(json.dumps([{"known_id": 0, "prompt": "Tokyo is the capital of", "subject": "Tokyo", "attribute": None}]))
    assert main(["--facts", str(facts), "--kinds", "mlp", "--groups", "last_subject", "--samples", "1", "--window", "1", "-q"]) == 0
    layer = int(capsys.readouterr().out.split("chosen edit layer: ")[1].split()[0])
    assert cached_layer_choice(cli_model, cache_dir=tmp_path / "cache")["layer"] == layer


def test_cli_traces_in_bfloat16(tiny_model, monkeypatch, tmp_path, capsys):
    import copy

    import torch

    loaded = copy.deepcopy(tiny_model)  # the CLI casts in place: never the shared fixture
    monkeypatch.setattr("tracer.model.load_model", lambda *a, **k: loaded)
    monkeypatch.setenv("ROMELENS_CACHE", str(tmp_path / "cache"))
    rc = main(["--prompt", "Tokyo is the capital of", "--subject", "Tokyo", "--kind", "mlp", "--samples", "1",
               "--window", "1", "--dtype", "bfloat16", "-q"])
    assert rc == 0 and "max indirect effect" in capsys.readouterr().out
    assert next(loaded.parameters()).dtype == torch.bfloat16


def test_cli_refuses_a_reduced_dtype_with_ray(capsys):
    with pytest.raises(SystemExit):
        main(["--facts", "k.json", "--dtype", "bfloat16", "--ray", "local"])
    assert "workers load the model in float32" in capsys.readouterr().err
