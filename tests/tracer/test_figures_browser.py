"""Saved HTML figures render in a real headless browser with the network off.

Each figure is opened as a `file://` page in Chromium with every request sent to a proxy
that does not exist (loopback included), so a page that needs a CDN shows nothing. The
check is that plotly.js ran and drew the plot: its `main-svg` elements are in the DOM.
A CDN page under the same conditions must not render, or the check proves nothing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from plotly.offline import get_plotlyjs_version

from tracer.result import PLOTLY_JS, TraceResult, save_figure

BROWSER = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
needs_browser = pytest.mark.skipif(
    BROWSER is None,
    reason="no chromium, chromium-browser or google-chrome on PATH; install one (apt-get install chromium) "
    "to check that saved figures render offline",
)
DOCS = Path(__file__).resolve().parents[2] / "docs"


def render(html: Path, tmp_path: Path) -> str:
    """The DOM of `html` after Chromium loaded it offline (proxy to nowhere, loopback not bypassed)."""
    cmd = [
        BROWSER, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
        "--virtual-time-budget=5000", "--dump-dom", html.resolve().as_uri(),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert "</html>" in out.stdout, f"chromium gave no DOM (exit {out.returncode}): {out.stderr[-2000:]}"
    return out.stdout


def drawn(dom: str) -> bool:
    return 'class="main-svg"' in dom


def _res():
    return TraceResult(
        scores=torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.9, 0.4], [0.1, 0.1, 0.8]]), low=0.1, high=0.8,
        prompt="A B is", tokens=("<bos>", "▁Eiffel", "▁is"), subject=(1, 2), target=" Paris", target_id=7,
        kind="mlp", window=2, samples=3, noise_std=1.5,
    )


def _summary(out_dir: Path) -> None:
    """A benchmark run's summary and figure from two fake metric columns (no model)."""
    from benchmarks.runner import write_summary  # noqa: PLC0415

    cols = {"ES": {"mean": 90.0, "ci95": 5.0}, "PS": {"mean": 70.0, "ci95": None}}
    write_summary(out_dir=out_dir, rows=[{"case_id": 0}], columns=cols, column_order=["ES", "PS"],
                  meta={"benchmark": "counterfact", "method": "fake", "model": "tiny"}, requested=1)


@needs_browser
def test_trace_figure_renders_offline_and_cdn_page_does_not(tmp_path):
    html = _res().save(tmp_path / "out" / "trace.html")
    assert (tmp_path / "out" / PLOTLY_JS).is_file()
    assert drawn(render(html, tmp_path))
    # the old behaviour: the same page loading plotly.js from the CDN stays blank offline
    text = html.read_text(encoding="utf-8")
    cdn = re.sub(r'src="plotly\.min\.js"', f'src="https://cdn.plot.ly/plotly-{get_plotlyjs_version()}.min.js"', text)
    assert cdn != text
    (tmp_path / "cdn").mkdir()
    (tmp_path / "cdn" / "trace.html").write_text(cdn, encoding="utf-8")
    assert not drawn(render(tmp_path / "cdn" / "trace.html", tmp_path))


@needs_browser
def test_benchmark_summary_figure_renders_offline(tmp_path):
    _summary(tmp_path / "run")
    dom = render(tmp_path / "run" / "figure.html", tmp_path)
    assert drawn(dom) and 'class="trace bars"' in dom  # the bar chart itself was drawn


@needs_browser
def test_shared_plotly_js_in_parent_folder_renders(tmp_path):
    # the layout of the committed docs figures: docs/results/<run>/figure.html -> ../../plotly.min.js
    html = save_figure(_res().plot(), tmp_path / "results" / "run" / "figure.html", plotly_js=tmp_path / PLOTLY_JS)
    assert drawn(render(html, tmp_path))


@needs_browser
@pytest.mark.parametrize("page", ["img/eiffel_gemma-3-270m.html", "results/cf-rome/figure.html"])
def test_committed_docs_figures_render_offline(page, tmp_path):
    assert drawn(render(DOCS / page, tmp_path))


def test_committed_docs_figures_load_a_local_plotly_js():
    pages = sorted(DOCS.glob("img/*.html")) + sorted(DOCS.glob("results/*/figure.html"))
    assert len(pages) >= 8
    for page in pages:
        srcs = re.findall(r"<script[^>]*\ssrc=\"([^\"]+)\"", page.read_text(encoding="utf-8"))
        assert srcs and all(not re.match(r"[a-z]+:", s) for s in srcs), (page, srcs)
        assert all((page.parent / s).resolve() == (DOCS / PLOTLY_JS).resolve() for s in srcs), (page, srcs)
    assert (DOCS / PLOTLY_JS).read_text(encoding="utf-8").startswith("/**")


def test_benchmark_summary_figure_loads_local_plotly_js(tmp_path):
    _summary(tmp_path / "run")
    srcs = re.findall(r"<script[^>]*\ssrc=\"([^\"]+)\"", (tmp_path / "run" / "figure.html").read_text())
    assert srcs == [PLOTLY_JS] and (tmp_path / "run" / PLOTLY_JS).is_file()
