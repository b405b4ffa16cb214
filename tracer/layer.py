"""Choose the layer to edit: where MLP restoration at the last subject token matters most.

ROME edits the MLP whose output, restored at the last subject token, has the largest
average indirect effect over known facts (paper, section 2.2 and Fig. 2). This module
computes that choice from a `DatasetTraceResult` (or traces the facts first) and returns
the evidence with it.

Every choice made for a model (any number of facts) is written to
`<cache root>/edit_layer/<model>-<weights hash>.json`, the file that the editors'
`default_layer` reads for a model without a preset: run `choose_edit_layer` once, with as
many facts as you like, and no edit traces again. `cache_dir="none"` writes nothing.

Example:
    >>> from tracer import load_model
    >>> from tracer.layer import choose_edit_layer
    >>> model = load_model("gemma-3-270m")
    >>> choice = choose_edit_layer(model, "../shared/data/known_1000.json", n=50)
    >>> choice.layer, choice.n_facts
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tracer.attribution import estimate_label, is_estimate
from tracer.dataset import DatasetTraceResult, trace_dataset
from tracer.files import atomic_write_text, safe_name
from tracer.model import bos_cache_tag, final_resid, model_device, model_name, weights_hash
from tracer.noise import NoiseCache
from tracer.offline import cache_root

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LayerChoice:
    """The chosen edit layer and the evidence for it.

    Attributes:
        layer: block index whose MLP has the largest average indirect effect.
        curve: average indirect effect per layer, `(n_layers,)` floats, in probability.
        ci: 95% confidence half-widths per layer, `(n_layers,)`.
        n_facts: facts averaged.
        kind: traced sublayer ("mlp").
        group: token group ("last_subject").
        window: restoration window used.
        runner_up: second-best layer.
        margin: `curve[layer] - curve[runner_up]`; compare with `ci` to judge how clear the choice is.
        method: "exact" (causal traces), or "atp" or "atp-logp" (from attribution-patching
            **estimates**; such a choice is not cached for the editor, which reads exact
            choices only).
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
    method: str = "exact"

    def plot(self):
        """The curve with its CI band, chosen layer marked: a plotly Figure (paper, Fig. 2 bottom)."""
        import plotly.graph_objects as go  # noqa: PLC0415

        x = list(range(len(self.curve)))
        hi = [m + c for m, c in zip(self.curve, self.ci)]
        lo = [m - c for m, c in zip(self.curve, self.ci)]
        fig = go.Figure()
        fig.add_trace(go.Scatter(x=x + x[::-1], y=hi + lo[::-1], fill="toself", opacity=0.2, line=dict(width=0), showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=list(self.curve), mode="lines+markers", name=f"{self.kind} @ {self.group}"))
        fig.add_vline(x=self.layer, line_dash="dash", annotation_text=f"layer {self.layer}")
        fig.update_layout(
            title=f"Average indirect effect of {self.kind.upper()} at the last subject token ({self.n_facts} facts)"
            + (f", {estimate_label(self.method)}" if is_estimate(self.method) else ""),
            xaxis_title=f"center of {self.window}-layer window",
            yaxis_title="average indirect effect",
            template="simple_white",
        )
        return fig


def choose_from_result(result: DatasetTraceResult, *, kind: str = "mlp", group: str = "last_subject") -> LayerChoice:
    """The layer with the largest average indirect effect of `kind` at `group` in `result`.

    Args:
        result: traces over facts (`trace_dataset`).
        kind: the traced sublayer.
        group: the token group, one of `tracer.dataset.GROUPS`.

    Returns:
        A `LayerChoice`; NaN layers rank last.

    Raises:
        ValueError: an unknown `group`, a `kind` that `result` did not trace, or no fact kept
            (`DatasetTraceResult.curve`).
    """
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
        method=result.method,
    )


def choose_edit_layer(
    model=None,
    facts=None,
    *,
    n: int | None = 100,
    window: int = 10,
    samples: int = 10,
    out: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    **trace_kwargs,
) -> LayerChoice:
    """Choose ROME's edit layer: the MLP with the largest average indirect effect at the last subject token.

    ROME section 2.2 and Figure 2: the edit goes where MLP restoration at the last subject
    token matters most.

    Args:
        model: the model (not needed when `facts` is a `DatasetTraceResult` holding "mlp").
        facts: a known_1000.json path, a list of facts, or a `DatasetTraceResult`.
        n: facts to trace (those the model gets right), when tracing.
        window: MLP restoration window.
        samples: noise samples.
        out: folder for resumable per-fact traces.
        cache_dir: cache root for the choice (`edit_layer_path`) and, unless `noise_cache` is
            given, the embedding statistics the noise scale is measured from (`<root>/noise`);
            "none" writes nothing. The choice is written whenever `model` is given, whatever `n`.
        **trace_kwargs: more `trace_dataset` options (noise, seed, batch_size, ...);
            `method="atp"` (or `"atp-logp"`) chooses from attribution-patching estimates (a quick screen,
            labelled as such and not cached for the editor).

    Returns:
        A `LayerChoice` with the layer and the curve, CIs and fact count behind it.

    Raises:
        ValueError: neither a `DatasetTraceResult` nor both `model` and `facts`; a result
            without "mlp" or with no fact kept; or arguments `trace_dataset` refuses.

    Example:
        >>> choose_edit_layer(model, "known_1000.json", n=50).layer
    """
    if isinstance(facts, DatasetTraceResult):
        choice = choose_from_result(facts)
    elif model is None or facts is None:
        raise ValueError(f"choose_edit_layer needs a model and facts, or a DatasetTraceResult; got facts={type(facts).__name__}")
    else:
        trace_kwargs.setdefault("groups", ("last_subject",))  # all the choice needs: ~n_tokens times cheaper
        if cache_dir is not None:  # the caller's cache root holds the noise statistics too, not the default one
            root = cache_root(cache_dir)
            trace_kwargs.setdefault("noise_cache", NoiseCache(root=root / "noise") if root else NoiseCache(use_disk=False))
        result = trace_dataset(model, facts, kinds=("mlp",), n=n, window=window, samples=samples, out=out, **trace_kwargs)
        choice = choose_from_result(result)
    if model is not None and choice.method == "exact" and choice.n_facts > 0 and math.isfinite(choice.curve[choice.layer]):
        save_layer_choice(model, choice, cache_dir=cache_dir)
    return choice


def edit_layer_path(model, *, model_hash: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """Where the edit-layer choice for `model`'s weights is cached, or None where caching is off.

    `<cache root>/edit_layer/<model name>-<weights hash>.json`; `model_hash` defaults to
    `weights_hash(model)` (the editors pass the hash from before any edit they applied).

    Args:
        model: the model the choice is for.
        model_hash: its weights hash; None computes it.
        cache_dir: the cache root; None the default, "none" turns caching off.

    Returns:
        The JSON file's path, or None.
    """
    root = cache_root(cache_dir)
    if root is None:
        return None
    name = safe_name(model_name(model).split("/")[-1].lower(), "_")
    return root / "edit_layer" / f"{name}{bos_cache_tag(model)}-{model_hash or weights_hash(model)}.json"


def save_layer_choice(model, choice, *, model_hash: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """Write `choice` (a `LayerChoice`) where `cached_layer_choice` finds it; atomic.

    Returns:
        The path written, or None where caching is off (`cache_dir="none"`).
    """
    path = edit_layer_path(model, model_hash=model_hash, cache_dir=cache_dir)
    if path is None:
        return None
    record = {
        "layer": int(choice.layer),
        "n_facts": int(getattr(choice, "n_facts", 0)),
        "window": getattr(choice, "window", None),
        "curve": [float(x) for x in getattr(choice, "curve", ())],
        "ci": [float(x) for x in getattr(choice, "ci", ())],
        "model": model_name(model),
    }
    atomic_write_text(path, json.dumps(record) + "\n")
    log.info("edit layer %d (%d facts) cached at %s", record["layer"], record["n_facts"], path)
    return path


def cached_layer_choice(model, *, model_hash: str | None = None, cache_dir: str | os.PathLike | None = None) -> dict | None:
    """The cached edit-layer choice for `model`'s weights (`{"layer", "n_facts", "curve", ...}`), or None.

    An unreadable or out-of-range file is ignored with a warning (and replaced by the next
    choice).

    Args:
        model: the model; its `cfg.n_layers` bounds the cached layer.
        model_hash, cache_dir: as in `edit_layer_path`.

    Returns:
        The record with its `"path"` added, or None when there is none (or caching is off).
    """
    path = edit_layer_path(model, model_hash=model_hash, cache_dir=cache_dir)
    if path is None or not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        layer = record["layer"]
        if isinstance(layer, int) and not isinstance(layer, bool) and 0 <= layer < model.cfg.n_layers:
            return {**record, "path": str(path)}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    log.warning("ignoring the unreadable cached edit layer %s", path)
    return None


@torch.no_grad()
def estimate_minutes(model, n: int, *, samples: int = 10, n_tokens: int = 12) -> float:
    """Rough minutes `choose_edit_layer(model, facts, n=n)` takes on this machine.

    Times a forward pass of `samples` rows of `n_tokens` tokens (a corrupted run of a
    typical known_1000 prompt; the fastest of 3, after one to warm up, so that a busy
    moment does not inflate it) and counts about `n_layers + 2` such passes per fact: the
    clean and corrupted runs, and one restored run per layer at the last subject token.

    Args:
        model: the model.
        n: facts to trace.
        samples: noise samples (rows per forward pass).
        n_tokens: prompt length assumed, in tokens (capped at `n_ctx`).

    Returns:
        The estimate, in minutes.
    """
    device = model_device(model)
    tokens = torch.zeros(samples, min(n_tokens, int(getattr(model.cfg, "n_ctx", n_tokens) or n_tokens)), dtype=torch.long, device=device)
    final_resid(model, tokens)  # warm up
    times = []
    for _ in range(3):
        start = time.perf_counter()
        final_resid(model, tokens)
        times.append(time.perf_counter() - start)
    return n * (model.cfg.n_layers + 2) * min(times) / 60.0
