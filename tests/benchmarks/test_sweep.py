"""The ROME validation sweep on the tiny model: one optimisation serves every key choice,
folders resume, the model is restored, bad specs fail before any work."""

import json

import pytest
import torch

from benchmarks import sweep
from benchmarks.data import load_counterfact
from editor import ROMEHParams, rome
from tests.conftest import FIXTURES
from tracer.model import weights_hash

HP = ROMEHParams(layer=1, v_lr=1.0, v_num_grad_steps=4, clamp_norm_factor=50.0, v_weight_decay=0.0,
                 kl_factor=0.0, context_lengths=((4, 1),), mom2_n_tokens=200)


def test_parse_configs():
    got = sweep.parse_configs(["base:", "c05:clamp_norm_factor=0.5,context_lengths=[[10,5]]", "k:key=original"])
    assert got == {"base": {}, "c05": {"clamp_norm_factor": 0.5, "context_lengths": ((10, 5),)}, "k": {"key": "original"}}
    for bad in ["nocolon", ":x=1", "a:b", "a b:x=1"]:
        with pytest.raises(ValueError, match="config"):
            sweep.parse_configs([bad])
    with pytest.raises(ValueError, match="twice"):
        sweep.parse_configs(["a:", "a:layer=1"])


def test_sweep_shares_the_optimisation_and_resumes(tiny_model, tmp_path, monkeypatch):
    records = load_counterfact(FIXTURES / "counterfact_tiny.json")[:2]
    eye = torch.eye(tiny_model.cfg.d_mlp)
    monkeypatch.setattr("editor.stats.layer_stats", lambda *a, **k: eye)
    calls = []
    real = rome.compute_factors

    def counting(*a, **k):
        calls.append(k.get("keys"))
        return real(*a, **k)

    monkeypatch.setattr(rome, "compute_factors", counting)
    before = weights_hash(tiny_model)
    keys = ["r-rome", "original"]
    configs = {"base": {}, "c2": {"clamp_norm_factor": 2.0}}
    runs = sweep.run_sweep(tiny_model, records, out=tmp_path, configs=configs, keys=keys, base=HP, cache_dir="none")
    assert weights_hash(tiny_model) == before
    assert len(calls) == len(records) * len(configs)  # one optimisation per record and config
    assert all(c == keys for c in calls)
    assert set(runs) == {"none", "base-r-rome", "base-original", "c2-r-rome", "c2-original"}
    for folder, (name, key, rows) in runs.items():
        assert [r["case_id"] for r in rows] == [r.case_id for r in records]
        assert (name, key) == ((None, None) if folder == "none" else (folder.split("-", 1)[0], folder.split("-", 1)[1]))
    # key choices share δ but give different edits, hence different scores
    a, b = runs["base-r-rome"][2][0], runs["base-original"][2][0]
    assert a["delta_norm"] == b["delta_norm"] and a["v_norm"] != b["v_norm"]
    assert a["edit_final_nll"] == b["edit_final_nll"] and 1 <= a["edit_steps"][0] <= HP.v_num_grad_steps
    assert set(a["delta_ratio"]) == {"1"}
    # a resumed sweep redoes nothing; a lost line is redone alone
    calls.clear()
    sweep.run_sweep(tiny_model, records, out=tmp_path, configs=configs, keys=keys, base=HP, cache_dir="none")
    assert calls == []
    path = tmp_path / "c2-original" / "records.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:1]) + "\n")
    runs = sweep.run_sweep(tiny_model, records, out=tmp_path, configs=configs, keys=keys, base=HP, cache_dir="none")
    assert len(calls) == 1 and len(runs["c2-original"][2]) == 2 and len(runs["c2-r-rome"][2]) == 2
    table = sweep.summarize(tmp_path, runs, configs=configs, base=HP, command="test", requested=2)
    assert "base-r-rome" in table and "none" in table
    s = json.loads((tmp_path / "c2-original" / "summary.json").read_text())
    assert "clamp_norm_factor=2.0" in s["hparams"] and "key='original'" in s["hparams"]


def test_sweep_rejects_unknown_fields_before_work(tiny_model, tmp_path):
    records = load_counterfact(FIXTURES / "counterfact_tiny.json")[:1]
    with pytest.raises(TypeError, match="clamp"):
        sweep.run_sweep(tiny_model, records, out=tmp_path, configs={"x": {"clamp": 1.0}}, keys=["r-rome"], base=HP)
    assert not (tmp_path / "none").exists()


def test_sweep_runs_the_editor_guards_first(tiny_model, tmp_path):
    records = load_counterfact(FIXTURES / "counterfact_tiny.json")[:1]
    with pytest.raises(ValueError, match="key"):
        sweep.run_sweep(tiny_model, records, out=tmp_path, configs={"b": {}}, keys=["rrome"], base=HP)
    with pytest.raises(ValueError, match="layer"):  # past the model: refused by editor.checks
        sweep.run_sweep(tiny_model, records, out=tmp_path, configs={"b": {"layer": 7}}, keys=["r-rome"], base=HP)
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("config,match", [("a:layr=3", "layr"), ("a:layer=-1", "layer"), ("a:key=R-ROME", "key"),
                                          ("a:mom2_adjustment=False", "mom2_adjustment"), ("a:v_lr=.5", "v_lr")])
def test_cli_checks_configs_before_loading_the_model(monkeypatch, tmp_path, config, match):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the configs were checked")

    monkeypatch.setattr("tracer.model.load_any", no_load)
    with pytest.raises(ValueError, match=match):
        sweep.main(["--start", "0", "--n", "1", "--out", str(tmp_path), "--config", config])
