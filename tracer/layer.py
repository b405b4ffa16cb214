"""Choose the layer to edit: where MLP restoration at the last subject token matters most.

ROME edits the MLP whose output, restored at the last subject token, has the largest
average indirect effect over known facts (paper, section 2.2 and Fig. 2). This module
computes that choice from a `DatasetTraceResult` (or traces the facts first) and returns
the evidence with it.

Example:
    >>> from tracer import load_model
    >>> from tracer.layer import choose_edit_layer
    >>> model = load_model("gemma-3-270m")
    >>> choice = choose_edit_layer(model, "../shared/data/known_1000.json", n=50)
    >>> choice.layer, choice.n_facts
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from tracer.dataset import DatasetTraceResult, trace_dataset


@dataclass(frozen=True, kw_only=True)
class LayerChoice:
    """The chosen edit layer and the evidence for it.

    Attributes:
        layer: block index whose MLP has the largest average indirect effect.
        curve: average indirect effect per layer, `(n_layers,)` floats.
        ci: 95% confidence half-widths per layer.
        n_facts: facts averaged.
        kind: traced sublayer ("mlp").
        group: token group ("last_subject").
        window: restoration window used.
        runner_up: second-best layer.
        margin: `curve[layer] - curve[runner_up]`; compare with `ci` to judge how clear the choice is.
    """

    layer: int
    curve: tuple[float, ...]
    ci: tuple[float, ...]
    n_facts: int
    kind: str = "mlp"
    group: str = "last_subject"
    window: int = 10
    runner_up: int = -1
    margin: float = 0.0

    def plot(self):
        """The curve with its CI band, chosen layer marked."""
        import plotly.graph_objects as go  # noqa: PLC0415

        x = list(range(len(self.curve)))
        hi = [m + c for m, c in zip(self.curve, self.ci)]
        lo = [m - c for m, c in zip(self.curve, self.ci)]
        fig = go.Figure()
        fig.add_trace(go.Scatter(x=x + x[::-1], y=hi + lo[::-1], fill="toself", opacity=0.2, line=dict(width=0), showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=list(self.curve), mode="lines+markers", name=f"{self.kind} @ {self.group}"))
        fig.add_vline(x=self.layer, line_dash="dash", annotation_text=f"layer {self.layer}")
        fig.update_layout(
            title=f"Average indirect effect of {self.kind.upper()} at the last subject token ({self.n_facts} facts)",
            xaxis_title=f"center of {self.window}-layer window",
            yaxis_title="average indirect effect",
            template="simple_white",
        )
        return fig


def choose_from_result(result: DatasetTraceResult, *, kind: str = "mlp", group: str = "last_subject") -> LayerChoice:
    """The layer with the largest average indirect effect of `kind` at `group` in `result`."""
    mean, ci = result.curve(kind, group)
    order = torch.argsort(torch.nan_to_num(mean, nan=-float("inf")), descending=True)
    best = int(order[0])
    second = int(order[1]) if len(order) > 1 else best
    return LayerChoice(
        layer=best,
        curve=tuple(float(x) for x in mean),
        ci=tuple(float(x) for x in ci),
        n_facts=result.n_facts,
        kind=kind,
        group=group,
        window=result.window,
        runner_up=second,
        margin=float(mean[best] - mean[second]),
    )


def choose_edit_layer(
    model=None,
    facts=None,
    *,
    n: int | None = 100,
    window: int = 10,
    samples: int = 10,
    out: str | os.PathLike | None = None,
    **trace_kwargs,
) -> LayerChoice:
    """Choose ROME's edit layer: the MLP with the largest average indirect effect at the last subject token.

    Args:
        model: the model (not needed when `facts` is a `DatasetTraceResult` holding "mlp").
        facts: a known_1000.json path, a list of facts, or a `DatasetTraceResult`.
        n: facts to trace (those the model gets right), when tracing.
        window: MLP restoration window.
        samples: noise samples.
        out: folder for resumable per-fact traces.
        **trace_kwargs: more `trace_dataset` options (noise, seed, batch_size, ...).

    Returns:
        A `LayerChoice` with the layer and the curve, CIs and fact count behind it.

    Example:
        >>> choose_edit_layer(model, "known_1000.json", n=50).layer
    """
    if isinstance(facts, DatasetTraceResult):
        return choose_from_result(facts)
    if model is None or facts is None:
        raise ValueError(f"choose_edit_layer needs a model and facts, or a DatasetTraceResult; got facts={type(facts).__name__}")
    trace_kwargs.setdefault("groups", ("last_subject",))  # all the choice needs: ~n_tokens times cheaper
    result = trace_dataset(model, facts, kinds=("mlp",), n=n, window=window, samples=samples, out=out, **trace_kwargs)
    return choose_from_result(result)
