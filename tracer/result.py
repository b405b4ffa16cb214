"""Trace results: `TraceResult` (one prompt, one kind) and its plotly heatmaps; figure files.

`save_figure` is the one writer of figure files in romelens: HTML pages load plotly.js from a
`plotly.min.js` beside them (written once per folder), so they open offline; PNG/SVG/PDF go
through kaleido and an installed Chrome or Chromium.

Example:
    >>> from tracer.trace import trace_all
    >>> from tracer.result import plot_traces, save_figure
    >>> results = trace_all(model, "The Eiffel Tower is located in the city of", "Eiffel Tower")
    >>> save_figure(plot_traces(list(results.values())), "trace.html")
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from tracer.attribution import estimate_label, is_estimate
from tracer.files import atomic_path, atomic_write_text

#: Colour scale per kind, as in the paper's Figure 1.
COLORSCALES = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}
KIND_NAMES = {"resid": "single restored layer", "mlp": "MLP", "attn": "Attn"}


def display_token(tok: str) -> str:
    """A token string for display: SentencePiece `▁` and byte-BPE `Ġ` shown as spaces."""
    return tok.replace("▁", " ").replace("Ġ", " ").replace("Ċ", "\\n")


@dataclass(frozen=True, kw_only=True)
class TraceResult:
    """A causal trace of one prompt for one kind of state (ROME section 2, Figure 1).

    Attributes:
        scores: `[pos, layer]` target probability (in [0, 1]) after restoring the state at
            (token, layer), averaged over noise samples.
        low: target probability in the corrupted run (the score of restoring nothing).
        high: target probability in the clean run.
        prompt: the prompt text.
        tokens: token strings, `pos` of them (BOS included when the model uses one).
        subject: `(start, end)` token span of the subject, end exclusive.
        target: the scored target token, decoded.
        target_id: its token id.
        kind: "resid", "mlp" or "attn".
        window: layers per restored window for "mlp"/"attn" (stored for "resid" too).
        samples: noise samples per condition.
        noise_std: noise standard deviation, in the units of the embeddings the first block
            receives (`hook_embed`); None with a corrupted prompt.
        severed: None, or the sublayer frozen at later layers ("mlp"/"attn").
        corrupted_prompt: the prompt used instead of noise, if any.
        model_name: the traced model.
        method: "exact" (restored runs, the paper's causal trace), or "atp" or "atp-logp"
            (attribution-patching **estimates** of the same scores, `tracer.attribution`);
            titles, hover text and saved JSON say which.
    """

    scores: Float[Tensor, "pos layer"]
    low: float
    high: float
    prompt: str
    tokens: tuple[str, ...]
    subject: tuple[int, int]
    target: str
    target_id: int
    kind: str
    window: int
    samples: int
    noise_std: float | None
    severed: str | None = None
    corrupted_prompt: str | None = None
    model_name: str = ""
    method: str = "exact"

    def indirect_effect(self) -> Float[Tensor, "pos layer"]:
        """`scores - low`, `[pos, layer]` probabilities: each state's indirect effect (ROME section 2)."""
        return self.scores - self.low

    @property
    def total_effect(self) -> float:
        """`high - low`, a probability: the total effect, how much the corruption costs the target."""
        return self.high - self.low

    def labels(self) -> list[str]:
        """Token labels with the subject tokens marked by '*', as in the paper."""
        a, b = self.subject
        return [display_token(t) + ("*" if a <= i < b else "") for i, t in enumerate(self.tokens)]

    def title(self) -> str:
        """The plot title, as in the paper's Figure 1 (and Figure 3 for a severed trace)."""
        if self.severed:
            title = f"Restoring state with {self.severed.upper()} severed"
        elif self.kind == "resid":
            title = "Impact of restoring state after corrupted input"
        else:
            title = f"Impact of restoring {KIND_NAMES[self.kind]} after corrupted input"
        return title + (f" ({estimate_label(self.method)})" if is_estimate(self.method) else "")

    def xlabel(self) -> str:
        """The x-axis label: the restored layer, or the centre of the restored window."""
        if self.kind == "resid":
            return "single restored layer"
        return f"center of interval of {self.window} restored {KIND_NAMES[self.kind]} layers"

    def heatmap(self, *, showscale: bool = True, colorbar_x: float | None = None):
        """The plotly `Heatmap` trace of this result (rows are tokens, columns layers)."""
        import plotly.graph_objects as go  # noqa: PLC0415

        scores = self.scores.float()
        ie = self.indirect_effect().float()
        n_pos, n_layers = scores.shape
        labels = self.labels()
        custom = [[[labels[t], float(ie[t, l])] for l in range(n_layers)] for t in range(n_pos)]
        est = " est." if is_estimate(self.method) else ""
        colorbar = dict(title=dict(text=f"p({self.target.strip()}){est}", side="bottom"), len=0.9)
        if colorbar_x is not None:
            colorbar["x"] = colorbar_x
        return go.Heatmap(
            z=scores.tolist(),
            x=list(range(n_layers)),
            y=list(range(n_pos)),
            colorscale=COLORSCALES[self.kind],
            zmin=self.low,
            zmax=max(float(scores.max()), self.low + 1e-6),
            customdata=custom,
            hovertemplate=(
                "token %{customdata[0]}<br>layer %{x}<br>p" + est + " = %{z:.4f}"
                "<br>indirect effect" + est + " %{customdata[1]:+.4f}<extra></extra>"
            ),
            showscale=showscale,
            colorbar=colorbar,
        )

    def plot(self, *, title: str | None = None):
        """A plotly Figure like the paper's Figure 1: tokens down, layers across, low..high colours.

        Args:
            title: the figure title; None uses `title()`.

        Returns:
            A `plotly.graph_objects.Figure` with one `[pos, layer]` heatmap.

        Example:
            >>> save_figure(res.plot(), "trace.html")
        """
        import plotly.graph_objects as go  # noqa: PLC0415

        fig = go.Figure(self.heatmap())
        self._style_axes(fig, row=None, col=None)
        fig.update_layout(
            title=title or self.title(),
            xaxis_title=self.xlabel(),
            width=520,
            height=120 + 26 * len(self.tokens),
            template="simple_white",
        )
        return fig

    def _style_axes(self, fig, row, col):
        kw = {} if row is None else dict(row=row, col=col)
        fig.update_yaxes(
            tickvals=list(range(len(self.tokens))),
            ticktext=self.labels(),
            autorange="reversed",
            **kw,
        )
        fig.update_xaxes(dtick=5 if self.scores.shape[1] > 12 else 1, **kw)

    def to_dict(self) -> dict:
        """A JSON-able dict (scores as nested lists); `from_dict` inverts it."""
        return {
            "scores": self.scores.tolist(),
            "low": self.low,
            "high": self.high,
            "prompt": self.prompt,
            "tokens": list(self.tokens),
            "subject": list(self.subject),
            "target": self.target,
            "target_id": self.target_id,
            "kind": self.kind,
            "window": self.window,
            "samples": self.samples,
            "noise_std": self.noise_std,
            "severed": self.severed,
            "corrupted_prompt": self.corrupted_prompt,
            "model_name": self.model_name,
            "method": self.method,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "TraceResult":
        """The `TraceResult` that `to_dict` wrote (scores back to a float32 tensor)."""
        d = dict(d)
        d["scores"] = torch.tensor(d["scores"], dtype=torch.float32)
        d["tokens"] = tuple(d["tokens"])
        d["subject"] = tuple(d["subject"])
        return cls(**d)

    def save(self, path: str | os.PathLike) -> Path:
        """Save the plot or the data (.json); see `save_figure` for the figure formats and paths.

        `.html` loads plotly.js from `plotly.min.js` beside it (written once per folder), so
        it opens offline; `.png`/`.svg`/`.pdf` need kaleido and a Chrome/Chromium browser.
        `~` is expanded and missing parent folders are created.

        Args:
            path: the file to write; `.json` saves `to_dict()`, any figure suffix the plot.

        Returns:
            The path written.

        Raises:
            ValueError: `path` is a folder or has a suffix other than `.json` and `FIGURE_SUFFIXES`.
            RuntimeError: a static image was asked for and kaleido or a browser is missing
                (`save_figure`).

        Example:
            >>> res.save("out/mlp.html"); res.save("out/mlp.json")
        """
        path = figure_path(path, extra=(".json",))
        if path.suffix.lower() == ".json":
            return atomic_write_text(path, json.dumps(self.to_dict()))
        return save_figure(self.plot(), path)


def plot_traces(results: Sequence[TraceResult], *, title: str | None = None):
    """The traces side by side (e.g. resid, mlp, attn of one prompt), each with its colour bar.

    Args:
        results: the traces, one `[pos, layer]` heatmap each, left to right.
        title: the figure title; None uses the first result's prompt.

    Returns:
        A plotly Figure with one subplot per result.

    Raises:
        ValueError: `results` is empty.

    Example:
        >>> save_figure(plot_traces([res_resid, res_mlp, res_attn]), "all.html")
    """
    from plotly.subplots import make_subplots  # noqa: PLC0415

    if not results:
        raise ValueError("results is empty; expected at least one TraceResult")
    k = len(results)
    fig = make_subplots(
        rows=1, cols=k, subplot_titles=[r.title() for r in results], horizontal_spacing=0.16 if k > 1 else 0.02
    )
    for i, r in enumerate(results, start=1):
        dom = fig.layout[f"xaxis{'' if i == 1 else i}"].domain
        fig.add_trace(r.heatmap(colorbar_x=dom[1] + 0.01), row=1, col=i)
        r._style_axes(fig, row=1, col=i)
        fig.update_xaxes(title_text=r.xlabel(), row=1, col=i)
    fig.update_layout(
        title=title or results[0].prompt,
        width=430 * k,
        height=140 + 26 * max(len(r.tokens) for r in results),
        template="simple_white",
    )
    fig.update_annotations(font_size=12)
    return fig


#: The plotly.js file name an HTML figure loads from its own folder (plotly's "directory" mode).
PLOTLY_JS = "plotly.min.js"

#: The suffixes `save_figure` writes: HTML (none means `.html`) and kaleido's static images.
FIGURE_SUFFIXES = (".html", ".htm", ".png", ".svg", ".pdf", ".jpg", ".jpeg", ".webp")


def figure_path(path: str | os.PathLike, *, extra: tuple[str, ...] = ()) -> Path:
    """`path` with `~` expanded, checked to name a file with a figure suffix (or one of `extra`).

    A missing parent folder is not an error: the writers create it (`tracer.files.atomic_path`).

    Raises:
        ValueError: `path` is an existing folder, or its suffix is not in `FIGURE_SUFFIXES`,
            `extra` or empty (which means `.html`); the message lists the supported suffixes.
    """
    expanded = Path(path).expanduser()
    if expanded.is_dir():
        raise ValueError(f"path {str(path)!r} is a folder; expected a file name such as {str(expanded / 'trace.html')!r}")
    suffix = expanded.suffix.lower()
    if suffix and suffix not in FIGURE_SUFFIXES + extra:
        raise ValueError(
            f"path {str(path)!r} has suffix {suffix!r}; expected one of {', '.join(extra + FIGURE_SUFFIXES)} "
            "(no suffix means .html)"
        )
    return expanded


#: Browser executables kaleido can drive, looked up on PATH (after `$BROWSER_PATH`).
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_browser() -> str | None:
    """The Chrome/Chromium binary kaleido will use: `$BROWSER_PATH`, else the first of `BROWSER_NAMES` on PATH."""
    env = os.environ.get("BROWSER_PATH")
    if env:
        return env if os.access(env, os.X_OK) else None
    return next((p for p in map(shutil.which, BROWSER_NAMES) if p), None)


def write_plotly_js(path: str | os.PathLike) -> Path:
    """Put plotly.py's bundled `plotly.min.js` at `path` unless the same file is already there.

    The file is written atomically, so concurrent writers never leave a half-written script;
    it is rewritten when missing or when its size differs from the bundle (another plotly
    version wrote it). Returns the path.
    """
    from plotly.offline import get_plotlyjs  # noqa: PLC0415

    path = Path(path)
    js = get_plotlyjs().encode("utf-8")
    try:
        if path.stat().st_size == len(js):
            return path
    except FileNotFoundError:
        pass
    with atomic_path(path) as tmp:
        tmp.write_bytes(js)
    return path


def figure_html(fig, folder: str | os.PathLike, *, plotly_js: str | os.PathLike | None = None) -> str:
    """A full HTML page for `fig`, to be saved in `folder`, that loads plotly.js from a local file.

    Every HTML figure romelens writes goes through here, so it opens offline (no CDN): by
    default with plotly's `include_plotlyjs="directory"`, a `<script src="plotly.min.js">`
    that one shared `folder/plotly.min.js` serves for every figure in the folder. The script
    file is written (atomically) if it is missing.

    Args:
        fig: a plotly Figure.
        folder: the folder the HTML file will be written to.
        plotly_js: a shared `plotly.min.js` elsewhere (the committed figures under `docs/`
            all load `docs/plotly.min.js`); the page loads it by its path relative to
            `folder`, so the two must keep their relative places. None: `folder/plotly.min.js`.

    Returns:
        The HTML text.

    Raises:
        ValueError: `plotly_js` does not name a `.js` file.

    Example:
        >>> atomic_write_text("out/fig.html", figure_html(fig, "out"))  # also writes out/plotly.min.js
    """
    folder = Path(folder)
    if plotly_js is None:
        write_plotly_js(folder / PLOTLY_JS)
        include: str = "directory"
    else:
        if not str(plotly_js).endswith(".js"):
            raise ValueError(f"plotly_js {str(plotly_js)!r} must name a .js file")
        write_plotly_js(plotly_js)
        include = Path(os.path.relpath(Path(plotly_js).resolve(), folder.resolve())).as_posix()
    return fig.to_html(include_plotlyjs=include, full_html=True)


def save_figure(fig, path: str | os.PathLike, *, plotly_js: str | os.PathLike | None = None) -> Path:
    """Write a plotly figure: `.html` always works offline; `.png`/`.svg`/`.pdf` need kaleido and a browser.

    An HTML figure loads plotly.js from `plotly.min.js` beside it, written once per folder
    (see `figure_html`; `plotly_js` points it at a shared copy instead). A static image is
    rendered by kaleido 1.x, which drives a Chrome or Chromium binary: `$BROWSER_PATH`, or
    one on PATH (`apt-get install chromium`); nothing is downloaded.

    Args:
        fig: a plotly Figure.
        path: the file to write; its suffix picks the format (none means `.html`; see
            `FIGURE_SUFFIXES`). `~` is expanded, and missing parent folders are created.
        plotly_js: for HTML, a shared `plotly.min.js` to load instead of one beside `path`.

    Returns:
        The path written.

    Raises:
        ValueError: `path` is a folder or has an unsupported suffix (the message lists the
            supported ones); nothing is written.
        RuntimeError: a static image was asked for and kaleido or a browser is missing, or
            kaleido could not render; the message says what to install.

    Example:
        >>> save_figure(res.plot(), "out/trace.html")  # writes out/trace.html and out/plotly.min.js
        >>> save_figure(res.plot(), "out/trace.png")   # needs romelens[png] and chromium
    """
    path = figure_path(path)
    suffix = path.suffix.lower()
    if suffix in ("", ".html", ".htm"):
        path = path.with_suffix(".html") if not suffix else path
        return atomic_write_text(path, figure_html(fig, path.parent, plotly_js=plotly_js))
    install = (
        "static images need kaleido (the romelens[png] extra, or pip install kaleido) and a Chrome or "
        "Chromium browser (apt-get install chromium, or any Chrome; set BROWSER_PATH to its binary "
        "if it is not on PATH)"
    )
    if importlib.util.find_spec("kaleido") is None:
        raise RuntimeError(
            f"saving {str(path)!r}: kaleido is not installed; {install}. "
            "Or save as .html, which needs nothing extra and opens offline"
        )
    with atomic_path(path) as tmp:
        try:
            fig.write_image(str(tmp), format=suffix[1:])
        except Exception as e:  # kaleido 1.x needs a Chrome binary
            if find_browser() is not None:
                why = f"{type(e).__name__}: {e}"
            elif os.environ.get("BROWSER_PATH"):
                why = f"no Chrome or Chromium browser was found: BROWSER_PATH={os.environ['BROWSER_PATH']!r} is not executable"
            else:
                why = f"no Chrome or Chromium browser was found: none of {', '.join(BROWSER_NAMES)} is on PATH"
            raise RuntimeError(f"kaleido could not render {str(path)!r} ({why}); {install}") from e
    return path
