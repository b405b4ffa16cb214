"""TraceResult plots, saving and the side-by-side figure."""

from __future__ import annotations

import pytest
import torch

from tracer.result import TraceResult, plot_traces, save_figure


def _res(kind="mlp"):
    return TraceResult(
        scores=torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.9, 0.4], [0.1, 0.1, 0.8]]), low=0.1, high=0.8,
        prompt="A B is", tokens=("<bos>", "▁Eiffel", "▁is"), subject=(1, 2), target=" Paris", target_id=7,
        kind=kind, window=2, samples=3, noise_std=1.5,
    )


def test_plot_marks_subject_and_uses_low_as_floor():
    fig = _res().plot()
    hm = fig.data[0]
    assert list(fig.layout.yaxis.ticktext) == ["<bos>", " Eiffel*", " is"]
    assert hm.zmin == pytest.approx(0.1) and hm.zmax == pytest.approx(0.9)
    assert hm.colorscale is not None and "indirect effect" in hm.hovertemplate
    assert hm.customdata[1][1][1] == pytest.approx(0.8)  # indirect effect at (token 1, layer 1)
    assert "MLP" in fig.layout.title.text


def test_plot_traces_side_by_side():
    fig = plot_traces([_res("resid"), _res("mlp"), _res("attn")])
    assert len(fig.data) == 3
    with pytest.raises(ValueError, match="results"):
        plot_traces([])


def test_save_html_and_json_and_png(tmp_path):
    res = _res()
    html = res.save(tmp_path / "t.html")
    assert "<html" in html.read_text().lower() and "Eiffel" in html.read_text()
    back = TraceResult.from_dict(__import__("json").loads(res.save(tmp_path / "t.json").read_text()))
    assert torch.allclose(back.scores, res.scores) and back.subject == res.subject
    with pytest.raises(ValueError, match="suffix"):
        save_figure(res.plot(), tmp_path / "t.txt")
    try:  # works only with kaleido and a Chrome binary; otherwise a clear RuntimeError
        png = res.save(tmp_path / "t.png")
        assert png.read_bytes()[:4] == b"\x89PNG"
    except RuntimeError as e:
        assert "kaleido" in str(e)
    assert not list(tmp_path.glob(".tmp-*"))  # atomic writes leave no temporaries
