"""benchmarks.trace_speed on the tiny model: it runs end to end and reports the FLOP floor and
the hook-free forward ceiling it compares the trace with (the figures are machine timings,
so only their presence and consistency are asserted)."""

from __future__ import annotations

import copy
import json
import math

import torch

from benchmarks import trace_speed


def test_forward_gflops_measures_blocks_and_unembedding(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    body, unembed = trace_speed.forward_gflops(tiny_model, 6, batch=4, reps=1)
    assert math.isfinite(body) and body > 0 and math.isfinite(unembed) and unembed > 0
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items())


def test_trace_speed_reports_floor_and_forward_ceiling(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trace_speed, "load_model", lambda name: copy.deepcopy(tiny_model))
    out = tmp_path / "speed.json"
    assert trace_speed.main(["--samples", "2", "--window", "2", "--ref-cells", "3", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["floor_s"] > 0 and rep["forward_ceiling_s"] > 0
    assert set(rep["forward_gflops"]) == {"blocks", "unembed"}
    # the floor is the trace's FLOPs at the matmul probe's rate; the ceiling, its blocks and its
    # unembedding at the rates the hook-free forward reached
    assert math.isclose(rep["floor_s"], rep["fast_tflop"] * 1e3 / rep["matmul_gflops"], rel_tol=1e-9)
    rates = rep["forward_gflops"]
    assert 0 < rep["fast_unembed_tflop"] < rep["fast_tflop"]
    body = rep["fast_tflop"] - rep["fast_unembed_tflop"]
    assert math.isclose(rep["forward_ceiling_s"], (body / rates["blocks"] + rep["fast_unembed_tflop"] / rates["unembed"]) * 1e3,
                        rel_tol=1e-9)
    printed = capsys.readouterr().out
    assert "FLOP floor at the matmul probe" in printed and "hook-free forward" in printed


def test_trace_speed_bf16_compares_the_forward_with_fp32(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trace_speed, "load_model", lambda name: copy.deepcopy(tiny_model))
    out = tmp_path / "speed.json"
    trace_speed.main(["--samples", "2", "--window", "2", "--ref-cells", "3", "--dtype", "bfloat16", "--json", str(out)])
    rep = json.loads(out.read_text())
    assert set(rep["forward_gflops_fp32"]) == {"blocks", "unembed"} and rep["forward_speedup_over_fp32"] > 0
    assert "makes the model's own forward" in capsys.readouterr().out


def test_trace_speed_leaves_gradients_on(tiny_model, monkeypatch, capsys):
    """main runs without gradients but must not switch them off for the rest of the process
    (it once did, and every later test that optimises failed)."""
    monkeypatch.setattr(trace_speed, "load_model", lambda name: copy.deepcopy(tiny_model))
    trace_speed.main(["--samples", "2", "--window", "2", "--ref-cells", "1"])
    assert torch.is_grad_enabled()
