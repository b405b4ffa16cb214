"""TraceResult plots, saving and the side-by-side figure."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import struct

import pytest
import torch
from plotly.offline import get_plotlyjs

from tracer.result import PLOTLY_JS, TraceResult, figure_html, plot_traces, save_figure


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


def test_save_html_and_json(tmp_path):
    res = _res()
    html = res.save(tmp_path / "t.html")
    assert "<html" in html.read_text().lower() and "Eiffel" in html.read_text()
    back = TraceResult.from_dict(json.loads(res.save(tmp_path / "t.json").read_text()))
    assert torch.allclose(back.scores, res.scores) and back.subject == res.subject
    with pytest.raises(ValueError, match="suffix"):
        save_figure(res.plot(), tmp_path / "t.txt")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic writes leave no temporaries


def test_save_paths_expand_home_create_folders_and_name_the_suffixes(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    res = _res()
    # "~" is the user's home, not a folder named "~" under the working directory
    assert res.save("~/figs/t.html") == tmp_path / "home" / "figs" / "t.html"
    assert (tmp_path / "home" / "figs" / PLOTLY_JS).is_file()
    assert res.save("~/data/t.json").is_file() and save_figure(res.plot(), "~/more/t").suffix == ".html"
    assert not (tmp_path / "~").exists()
    # missing parent folders are created, for figures and data alike
    assert res.save(tmp_path / "a" / "b" / "t.json").is_file()
    assert save_figure(res.plot(), tmp_path / "c" / "d" / "t.html").is_file()
    # an unknown suffix is refused before anything is written, listing what is supported
    for fn, listed in ((lambda p: save_figure(res.plot(), p), ".html, .htm, .png, .svg, .pdf"),
                       (res.save, ".json, .html, .htm, .png")):
        with pytest.raises(ValueError, match=rf"'.*t\.txt' has suffix '\.txt'; expected one of {re.escape(listed)}"):
            fn(tmp_path / "e" / "t.txt")
    assert not (tmp_path / "e").exists()
    with pytest.raises(ValueError, match="is a folder; expected a file name"):
        save_figure(res.plot(), tmp_path / "a")


def _script_srcs(html: str) -> list[str]:
    return re.findall(r"<script[^>]*\ssrc=\"([^\"]+)\"", html)


def test_html_loads_one_local_plotly_js_per_folder(tmp_path):
    # offline: no CDN; one plotly.min.js beside the figures, written once, rewritten when missing
    res = _res()
    a = res.save(tmp_path / "a.html")
    js = tmp_path / PLOTLY_JS
    assert _script_srcs(a.read_text()) == [PLOTLY_JS]
    assert "cdn.plot.ly" not in a.read_text() and len(a.read_text()) < 100_000  # not inlined either
    assert js.read_text(encoding="utf-8") == get_plotlyjs()
    inode = js.stat().st_ino
    save_figure(plot_traces([_res("resid"), res]), tmp_path / "b.html")
    assert js.stat().st_ino == inode  # not rewritten: same file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.html", "b.html", PLOTLY_JS]
    js.unlink()
    res.save(tmp_path / "c.html")
    assert js.read_text(encoding="utf-8") == get_plotlyjs()
    js.write_text("truncated")  # e.g. another plotly version's copy, or a broken one
    res.save(tmp_path / "d.html")
    assert js.read_text(encoding="utf-8") == get_plotlyjs()


def test_html_can_share_one_plotly_js_across_folders(tmp_path):
    shared = tmp_path / "plotly.min.js"
    out = save_figure(_res().plot(), tmp_path / "run" / "figure.html", plotly_js=shared)
    assert _script_srcs(out.read_text()) == ["../plotly.min.js"]
    assert shared.stat().st_size == len(get_plotlyjs().encode()) and not (tmp_path / "run" / PLOTLY_JS).exists()
    assert _script_srcs(figure_html(_res().plot(), tmp_path, plotly_js=shared)) == ["plotly.min.js"]
    with pytest.raises(ValueError, match="plotly_js"):
        figure_html(_res().plot(), tmp_path, plotly_js=tmp_path / "plotly")


def _browser() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.skipif(_browser() is None, reason="no chromium, chromium-browser or google-chrome on PATH "
                    "(apt-get install chromium): PNG export needs one")
def test_save_png(tmp_path):
    fig = _res().plot()
    png = _res().save(tmp_path / "t.png").read_bytes()
    assert _png_size(png) == (fig.layout.width, fig.layout.height) == (520, 198)
    assert len(png) > 2000  # a drawn heatmap, not an empty canvas
    assert not [p for p in tmp_path.iterdir() if p.name != "t.png"]  # written atomically


def test_png_without_kaleido_names_what_to_install(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "kaleido" else real(name, *a))
    with pytest.raises(RuntimeError, match=r"romelens\[png\].*apt-get install chromium"):
        save_figure(_res().plot(), tmp_path / "t.png")
    assert not (tmp_path / "t.png").exists()


def test_png_without_browser_names_what_to_install(tmp_path, monkeypatch):
    pytest.importorskip("kaleido", reason="kaleido is in the dev extra; install it (pip install 'romelens[png]')")
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chrome"))
    with pytest.raises(RuntimeError, match=r"no Chrome or Chromium browser was found.*apt-get install chromium"):
        save_figure(_res().plot(), tmp_path / "t.png")
    assert list(tmp_path.iterdir()) == []
