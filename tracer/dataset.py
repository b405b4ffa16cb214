"""Causal tracing over a set of known facts: average indirect effects by token group (paper, Fig. 2).

For each fact the model gets right (its clean top-1 next token is the first token of the
known attribute), every requested kind is traced and its indirect effect `scores - low` is
averaged inside six token groups, as in the paper's notebook:

- "first_subject": the first subject token;
- "middle_subject": subject tokens strictly between the first and the last;
- "last_subject": the last subject token;
- "first_subsequent": the first token after the subject;
- "further": tokens after that, up to but excluding the last token;
- "last": the last token of the prompt.

As in the paper, the groups may overlap (a one-token subject is both first and last subject
token; a subject ending right before the last token makes "first_subsequent" the last
token). An empty group (e.g. "middle_subject" for a two-token subject) is left out of that
fact's average. Each fact weighs equally: a group's per-fact value is the mean over its
tokens, then `mean` and a 95% confidence interval (`1.96 * std / sqrt(n)`) are taken over
facts.

One JSON line per fact is appended to `<out>/traces.jsonl` as soon as it finishes (facts the
model gets wrong are recorded too, as dropped), so a rerun with the same settings resumes.
The file is read back under `tracer.resume`'s rule: a torn last line (a killed write) is
cut and its fact redone, while an unreadable line with facts after it means a corrupt file
and raises `ValueError` (nothing is skipped silently).

With `workers=` (a `tracer.workers.WorkerPool`) the known facts are traced by Ray workers
(`trace_fact`, the one implementation of tracing a fact) and this process alone appends
their lines, in completion order; the result is the same (docs/scaling.md).

Example:
    >>> from tracer import load_model
    >>> from tracer.dataset import trace_dataset
    >>> model = load_model("gemma-3-270m")
    >>> ds = trace_dataset(model, "../shared/data/known_1000.json", n=20, out="runs/known20")
    >>> mean, ci = ds.curve("mlp", "last_subject")
"""

from __future__ import annotations

import json
import logging
import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from tracer.batching import pad_tokens
from tracer.hooks import KINDS
from tracer.model import final_logits, final_resid, model_device, model_dtype, model_name
from tracer.noise import NoiseCache, NoiseScale, resolve_noise
from tracer.prompts import encode, target_ids
from tracer.files import atomic_write_text
from tracer.result import TraceResult, save_figure
from tracer.resume import append_jsonl, read_jsonl
from tracer.attribution import attribution_scores, check_method, estimate_label, is_estimate
from tracer.trace import prepare_runs, restore_scores

log = logging.getLogger(__name__)

GROUPS: tuple[str, ...] = ("first_subject", "middle_subject", "last_subject", "first_subsequent", "further", "last")
GROUP_LABELS = {
    "first_subject": "First subject token",
    "middle_subject": "Middle subject tokens",
    "last_subject": "Last subject token",
    "first_subsequent": "First subsequent token",
    "further": "Further tokens",
    "last": "Last token",
}


def default_data_dir() -> Path:
    """`$ROMELENS_DATA`, else `../shared/data` next to the repository root (which may not exist)."""
    if os.environ.get("ROMELENS_DATA"):
        return Path(os.environ["ROMELENS_DATA"])
    return Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass(frozen=True, kw_only=True)
class Fact:
    """One known fact.

    Attributes:
        prompt: the prompt, subject included (or a `{}` template).
        subject: the subject string.
        attribute: the true answer; None to accept whatever the model predicts.
        known_id: a stable id, used to resume.
    """

    prompt: str
    subject: str
    attribute: str | None = None
    known_id: int | str = 0


def load_facts(facts: str | os.PathLike | Iterable) -> list[Fact]:
    """Facts from a known_1000.json path, or from dicts/objects with prompt, subject, attribute.

    A missing attribute falls back to the record's "prediction"; a missing known_id to the
    record's index.

    Args:
        facts: a path to a known_1000.json file, or an iterable of `Fact`s, mappings or
            objects with `prompt`, `subject` and optionally `attribute`, `known_id`.

    Returns:
        The facts, in order.

    Raises:
        ValueError: a path that is not a file, or a record without string `prompt` and
            `subject`.

    Example:
        >>> load_facts([{"prompt": "The Eiffel Tower is in", "subject": "Eiffel Tower", "attribute": "Paris"}])
    """
    if isinstance(facts, (str, os.PathLike)):
        p = Path(facts)
        if not p.is_file():
            raise ValueError(f"facts {str(facts)!r} is not a file; expected a known_1000.json path")
        facts = json.loads(p.read_text())
    out = []
    for i, f in enumerate(facts):
        if isinstance(f, Fact):
            out.append(f)
            continue
        get = f.get if isinstance(f, Mapping) else (lambda k, d=None, f=f: getattr(f, k, d))
        prompt, subject = get("prompt"), get("subject")
        if not isinstance(prompt, str) or not isinstance(subject, str):
            raise ValueError(f"fact {i} {f!r} needs string 'prompt' and 'subject'")
        attr = get("attribute", None)
        if attr is None:
            attr = get("prediction", None)
        out.append(Fact(prompt=prompt, subject=subject, attribute=attr, known_id=get("known_id", i)))
    return out


@torch.no_grad()
def known_mask(model, facts: Sequence[Fact], *, batch_size: int = 32) -> list[bool]:
    """Whether the model's clean top-1 next token is the first token of each fact's attribute.

    Args:
        model: a TransformerLens model with a tokenizer.
        facts: the facts; one with `attribute=None` counts as known.
        batch_size: prompts per forward pass.

    Returns:
        One bool per fact.

    Raises:
        ValueError: a prompt or attribute that `encode` / `target_ids` refuse (empty, or
            longer than the model's context `n_ctx`).

    Example:
        >>> sum(known_mask(model, load_facts("known_1000.json")))
    """
    device = model_device(model)
    out = []
    for b in range(0, len(facts), batch_size):
        chunk = facts[b : b + batch_size]
        seqs = [encode(model, f.prompt.replace("{}", f.subject)) for f in chunk]
        tokens = pad_tokens(model, seqs, device)  # right-padded: causal, so exact
        last = torch.tensor([len(s) - 1 for s in seqs], device=device)
        resid = final_resid(model, tokens)[torch.arange(len(seqs), device=device), last]
        top = final_logits(model, resid).argmax(-1).tolist()
        for f, t in zip(chunk, top):
            if f.attribute is None:
                out.append(True)
            else:
                out.append(t == target_ids(model, f.prompt.replace("{}", f.subject), f.attribute)[0])
    return out


def group_tokens(subject: tuple[int, int], n_pos: int) -> dict[str, list[int]]:
    """Token positions of each group for a prompt of `n_pos` tokens with subject span `subject`.

    Args:
        subject: `(start, end)` subject token span, end exclusive.
        n_pos: the prompt's length in tokens.

    Returns:
        Each name of `GROUPS` mapped to its token positions (possibly empty).
    """
    a, b = subject
    last = n_pos - 1
    return {
        "first_subject": [a],
        "middle_subject": list(range(a + 1, b - 1)),
        "last_subject": [b - 1],
        "first_subsequent": [b] if b <= last else [],
        "further": list(range(b + 1, last)),
        "last": [last],
    }


def group_effects(res: TraceResult) -> torch.Tensor:
    """`[len(GROUPS), n_layers]` mean indirect effect (probabilities) per token group of `res`.

    NaN for an empty or untraced group (ROME section 2, Figure 2's token groups).

    Args:
        res: one prompt's `TraceResult` (`scores [n_pos, n_layers]`, its subject span).

    Returns:
        `[len(GROUPS), n_layers]` float32: each group's mean of `scores - low` over its tokens.
    """
    ie = res.indirect_effect().float()
    idx = group_tokens(res.subject, ie.shape[0])
    rows = [ie[idx[g]].mean(0) if idx[g] else torch.full((ie.shape[1],), float("nan")) for g in GROUPS]
    return torch.stack(rows)


def mean_ci(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, 95% CI half-width (`1.96 * std / sqrt(n)`) and count over dim 0, ignoring NaNs.

    Args:
        x: `[n, ...]` values, NaN where missing.

    Returns:
        `(mean, ci, n)`, each `x.shape[1:]`; mean is NaN where `n == 0`, ci where `n < 2`.
    """
    ok = ~torch.isnan(x)
    n = ok.sum(0)
    z = torch.where(ok, x, torch.zeros_like(x))
    mean = z.sum(0) / n.clamp(min=1)
    var = (torch.where(ok, x - mean, torch.zeros_like(x)) ** 2).sum(0) / (n - 1).clamp(min=1)
    ci = 1.96 * var.sqrt() / n.clamp(min=1).sqrt()
    mean = torch.where(n > 0, mean, torch.full_like(mean, float("nan")))
    ci = torch.where(n > 1, ci, torch.full_like(ci, float("nan")))
    return mean, ci, n


@dataclass(frozen=True, kw_only=True)
class DatasetTraceResult:
    """Average indirect effects over facts, per kind, token group and layer (ROME section 2, Figure 2).

    Attributes:
        model_name: the traced model.
        kinds: traced kinds.
        effects: per kind, `[n_facts, len(GROUPS), n_layers]` per-fact group indirect
            effects, in probability (NaN for an empty or untraced group).
        high: clean target probability per kept fact, `[n_facts]`.
        low: corrupted target probability per kept fact, `[n_facts]` (the same for every kind).
        known_ids: ids of the kept facts, in order.
        n_tried: facts checked; `n_facts + n_dropped`.
        n_dropped: facts the model got wrong (not traced).
        window: mlp/attn window.
        samples: noise samples.
        noise_std: noise standard deviation, in `hook_embed` units.
        method: "exact" (restored runs), or "atp" or "atp-logp" (attribution-patching
            estimates, `tracer.attribution`); the summary and the plot titles say which.

    Raises:
        ValueError: from `mean`, `ci`, `curve` and the plots, for a kind that was not
            traced, an unknown group, or a result with no fact kept.
    """

    model_name: str
    kinds: tuple[str, ...]
    effects: dict = field(repr=False)
    high: torch.Tensor = field(repr=False)
    low: torch.Tensor = field(repr=False)
    known_ids: tuple = field(repr=False)
    n_tried: int
    n_dropped: int
    window: int
    samples: int
    noise_std: float
    method: str = "exact"

    @property
    def n_facts(self) -> int:
        """Facts kept (the model got them right) and averaged."""
        return len(self.known_ids)

    def mean(self, kind: str) -> torch.Tensor:
        """`[len(GROUPS), n_layers]` average indirect effect of `kind`, in probability.

        Raises:
            ValueError: `kind` was not traced, or no fact was kept.
        """
        return mean_ci(self._effects(kind))[0]

    def ci(self, kind: str) -> torch.Tensor:
        """`[len(GROUPS), n_layers]` 95% CI half-widths of `mean(kind)`.

        Raises:
            ValueError: `kind` was not traced, or no fact was kept.
        """
        return mean_ci(self._effects(kind))[1]

    def curve(self, kind: str, group: str = "last_subject") -> tuple[torch.Tensor, torch.Tensor]:
        """`(mean, ci)` over layers for one kind and token group, each `[n_layers]`.

        Args:
            kind: a traced kind ("resid", "mlp", "attn").
            group: one of `GROUPS`.

        Returns:
            The average indirect effect and its 95% CI half-width per layer.

        Raises:
            ValueError: an unknown `group`, a `kind` that was not traced, or no fact kept.
        """
        if group not in GROUPS:
            raise ValueError(f"group {group!r} is unknown; expected one of {GROUPS}")
        g = GROUPS.index(group)
        return self.mean(kind)[g], self.ci(kind)[g]

    def _effects(self, kind):
        if kind not in self.effects:
            raise ValueError(f"kind {kind!r} was not traced; traced kinds are {self.kinds}")
        if self.n_facts == 0:
            raise ValueError("no fact was kept (the model got none right); nothing to average")
        return self.effects[kind]

    def _estimate(self) -> str:
        return f", {estimate_label(self.method)}" if is_estimate(self.method) else ""

    def summary(self) -> dict:
        """JSON-able summary: counts, average total effect, and mean/CI tables per kind.

        Returns:
            A dict with the counts and settings, `avg_high` / `avg_low` (mean clean and
            corrupted target probabilities) and per kind `{"mean", "ci", "n"}` as nested
            `[len(GROUPS)][n_layers]` lists in probability (None for NaN), when a fact was kept.
        """
        out = {
            "model_name": self.model_name,
            "n_tried": self.n_tried,
            "n_facts": self.n_facts,
            "n_dropped": self.n_dropped,
            "window": self.window,
            "samples": self.samples,
            "noise_std": self.noise_std,
            "method": self.method,
            "estimate": is_estimate(self.method),
            "groups": list(GROUPS),
        }
        if self.n_facts:
            out["avg_high"] = float(self.high.mean())
            out["avg_low"] = float(self.low.mean())
            for k in self.kinds:
                m, c, n = mean_ci(self.effects[k])
                out[k] = {"mean": _nan_list(m), "ci": _nan_list(c), "n": n[:, 0].tolist()}
        return out

    def plot_heatmaps(self):
        """Average indirect effect per token group x layer, one heatmap per kind (paper, Fig. 2 top).

        Returns:
            A plotly Figure with one `[len(GROUPS), n_layers]` heatmap per kind.

        Raises:
            ValueError: no fact was kept.
        """
        import plotly.graph_objects as go  # noqa: PLC0415
        from plotly.subplots import make_subplots  # noqa: PLC0415

        from tracer.result import COLORSCALES  # noqa: PLC0415

        k = len(self.kinds)
        fig = make_subplots(rows=1, cols=k, subplot_titles=[f"Average indirect effect: {_kind_name(x)}" for x in self.kinds], horizontal_spacing=0.18)
        for i, kind in enumerate(self.kinds, start=1):
            m, c = self.mean(kind), self.ci(kind)
            n_layers = m.shape[1]
            dom = fig.layout[f"xaxis{'' if i == 1 else i}"].domain
            custom = [[[GROUP_LABELS[g], float(c[gi, l])] for l in range(n_layers)] for gi, g in enumerate(GROUPS)]
            fig.add_trace(
                go.Heatmap(
                    z=_nan_list(m),
                    x=list(range(n_layers)),
                    y=list(range(len(GROUPS))),
                    colorscale=COLORSCALES[kind],
                    customdata=custom,
                    colorbar=dict(x=dom[1] + 0.01, len=0.9),
                    hovertemplate="%{customdata[0]}<br>layer %{x}<br>AIE %{z:.4f} ± %{customdata[1]:.4f}<extra></extra>",
                ),
                row=1,
                col=i,
            )
            fig.update_yaxes(tickvals=list(range(len(GROUPS))), ticktext=[GROUP_LABELS[g] for g in GROUPS], autorange="reversed", row=1, col=i)
            fig.update_xaxes(title_text="layer", row=1, col=i)
        fig.update_layout(
            title=f"{self.model_name}: {self.n_facts} known facts (window {self.window}){self._estimate()}",
            width=430 * k,
            height=380,
            template="simple_white",
        )
        return fig

    def plot_lines(self, groups: Sequence[str] = ("last_subject", "last")):
        """Average indirect effect by layer with 95% CI bands, one panel per kind (paper, Fig. 2 bottom).

        Args:
            groups: the token groups drawn, one line each.

        Returns:
            A plotly Figure with one panel per kind.

        Raises:
            ValueError: a group not in `GROUPS`, or no fact was kept.
        """
        import plotly.graph_objects as go  # noqa: PLC0415
        from plotly.subplots import make_subplots  # noqa: PLC0415

        colours = {
            "first_subject": "#9ecae1", "middle_subject": "#6baed6", "last_subject": "#d62728",
            "first_subsequent": "#bcbd22", "further": "#7f7f7f", "last": "#1f77b4",
        }
        k = len(self.kinds)
        fig = make_subplots(rows=1, cols=k, subplot_titles=[_kind_name(x) for x in self.kinds])
        for i, kind in enumerate(self.kinds, start=1):
            for g in groups:
                m, c = self.curve(kind, g)
                x = list(range(len(m)))
                lo, hi = _nan_list(m - c), _nan_list(m + c)
                fig.add_trace(go.Scatter(x=x + x[::-1], y=hi + lo[::-1], fill="toself", fillcolor=colours[g], opacity=0.2, line=dict(width=0), hoverinfo="skip", showlegend=False), row=1, col=i)
                fig.add_trace(go.Scatter(x=x, y=_nan_list(m), mode="lines+markers", line=dict(color=colours[g]), name=GROUP_LABELS[g], legendgroup=g, showlegend=i == 1), row=1, col=i)
            fig.update_xaxes(title_text="layer", row=1, col=i)
        fig.update_yaxes(title_text="average indirect effect", row=1, col=1)
        fig.update_layout(title=f"{self.model_name}: average indirect effect, {self.n_facts} facts{self._estimate()}", width=420 * k, height=380, template="simple_white")
        return fig

    def save(self, folder: str | os.PathLike) -> Path:
        """Write `summary.json`, `heatmaps.html` and `lines.html` into `folder`.

        The two figures share one `folder/plotly.min.js` (written once, see
        `tracer.result.save_figure`), so they open offline. With no fact kept only
        `summary.json` is written.

        Args:
            folder: where the files go (made if needed).

        Returns:
            `folder`, as a `Path`.

        Raises:
            OSError: a file cannot be written (each is written atomically).
        """
        folder = Path(folder)
        atomic_write_text(folder / "summary.json", json.dumps(self.summary(), indent=1))
        if self.n_facts:
            save_figure(self.plot_heatmaps(), folder / "heatmaps.html")
            save_figure(self.plot_lines(), folder / "lines.html")
        return folder


def _kind_name(kind):
    return {"resid": "hidden state", "mlp": "MLP", "attn": "Attention"}[kind]


def _nan_list(t: torch.Tensor):
    """Nested list with NaN as None (valid JSON, plotly gaps)."""
    return [_nan_list(x) for x in t] if t.ndim else (None if math.isnan(float(t)) else float(t))


def _tensor(rows) -> torch.Tensor:
    """Inverse of `_nan_list`: None back to NaN."""
    return torch.tensor([[float("nan") if x is None else x for x in row] for row in rows], dtype=torch.float32)


def _read_records(path: Path, *, repair: bool = True) -> dict:
    """The facts already in `traces.jsonl`, keyed by `str(known_id)`, under `tracer.resume`'s rule.

    With `repair`, a torn last line (a killed write) is dropped and cut from the file, so its
    fact is redone; without it the file is only read. A corrupt line with rows after it raises
    `ValueError`.
    """
    return read_jsonl(path, key=lambda r: str(r["known_id"]), repair=repair)


def read_run(folder: str | os.PathLike) -> tuple[dict, dict]:
    """A `trace_dataset` run folder, read and never written: its config and its facts.

    Args:
        folder: a folder `trace_dataset(out=...)` wrote.

    Returns:
        `(config, records)`: the `config.json` dict, and the `traces.jsonl` lines keyed by
        `str(known_id)` (dropped facts included, with `"correct": False`).

    Raises:
        ValueError: `folder` has no `config.json`, or `traces.jsonl` has an unreadable line
            (`tracer.resume.read_jsonl`).
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"no config.json in {str(folder)!r}: not a trace_dataset run folder")
    return json.loads((folder / "config.json").read_text()), _read_records(folder / "traces.jsonl", repair=False)


def run_options(config: dict) -> dict:
    """The `trace_dataset` keyword arguments of the run `config` describes (see `read_run`).

    Its kinds, groups, window, samples, seed, method, and its measured noise std as a
    `NoiseScale`, so that a call with them and the same model resumes (or reads back) that
    folder instead of refusing it as a run with other settings, and a call into another
    folder traces under exactly the same settings.
    """
    return {"kinds": tuple(config["kinds"]), "groups": tuple(config["groups"]), "window": config["window"],
            "samples": config["samples"], "seed": config["seed"], "method": config.get("method", "exact"),
            "noise": NoiseScale(value=config["noise_std"])}


def trace_fact(
    model,
    fact: Fact,
    *,
    kinds: Sequence[str] = KINDS,
    groups: Sequence[str] | None = None,
    window: int = 10,
    samples: int = 10,
    noise_std: float,
    seed: int = 0,
    batch_size: int = 128,
    method: str = "exact",
) -> dict:
    """The `traces.jsonl` line of one fact the model gets right: its traces of every kind.

    The one implementation of tracing a fact, which `trace_dataset` runs in this process or
    sends to Ray workers (`workers=`).

    Args:
        model: a TransformerLens model with a tokenizer.
        fact: the fact (known: `known_mask` said the model gets it right).
        kinds, groups, window, samples, seed, batch_size, method: as in `trace_dataset`
            (`groups` None: all tokens).
        noise_std: the noise std in `hook_embed` units (`resolve_noise`).

    Returns:
        The JSON-able line: `known_id`, `prompt`, `subject`, `attribute`, `correct` (True),
        `predicted`, `subject_span`, `tokens`, `high`, `low` and per kind `scores`
        (`[n_pos][n_layers]`, None where not traced).

    Raises:
        ValueError: what `prepare_runs`, `restore_scores` or `attribution_scores` refuse.

    Example:
        >>> rec = trace_fact(model, Fact(prompt="{} is in", subject="Paris"), kinds=("mlp",), noise_std=0.1)
    """
    groups = tuple(GROUPS if groups is None else groups)
    rec = _fact_line(fact, True)
    target = None if fact.attribute is None else target_ids(model, rec["prompt"], fact.attribute)[0]
    runs = prepare_runs(model, rec["prompt"], fact.subject, target=target, samples=samples, noise=NoiseScale(value=noise_std), seed=seed)
    where = group_tokens(runs.prompt.subject, len(runs.prompt.ids))
    todo = None if set(groups) == set(GROUPS) else sorted({t for g in groups for t in where[g]})
    rec["predicted"] = model.tokenizer.decode([runs.target_id])
    rec["subject_span"] = list(runs.prompt.subject)
    rec["tokens"] = list(runs.prompt.tokens)
    rec["high"], rec["low"] = runs.high, runs.low
    if is_estimate(method):
        est = attribution_scores(model, runs, kinds=tuple(kinds), window=window, method=method)
        rec["scores"] = {k: _nan_list(est[k]) for k in kinds}
    else:
        rec["scores"] = {
            k: _nan_list(restore_scores(model, runs, kind=k, window=window, batch_size=batch_size, tokens=todo))
            for k in kinds
        }
    return rec


def _fact_line(fact: Fact, correct: bool) -> dict:
    """The fields of a fact's line that do not need tracing (all of a dropped fact's line)."""
    prompt = fact.prompt.replace("{}", fact.subject)
    return {"known_id": fact.known_id, "prompt": prompt, "subject": fact.subject, "attribute": fact.attribute, "correct": bool(correct)}


def trace_dataset(
    model,
    facts,
    *,
    kinds: Sequence[str] = KINDS,
    n: int | None = None,
    out: str | os.PathLike | None = None,
    groups: Sequence[str] | None = None,
    window: int = 10,
    samples: int = 10,
    noise: float | NoiseScale = 3.0,
    seed: int = 0,
    batch_size: int = 128,
    noise_reference: str | os.PathLike | None = None,
    noise_cache: NoiseCache | None = None,
    progress: bool = True,
    method: str = "exact",
    workers=None,
) -> DatasetTraceResult:
    """Trace many facts and average the indirect effects by token group (paper, Fig. 2).

    Args:
        model: a TransformerLens model with a tokenizer.
        facts: a known_1000.json path, or a list of dicts/objects with prompt, subject and
            attribute (or prediction), optionally known_id.
        kinds: kinds to trace.
        n: stop after this many facts the model gets right (None: all).
        out: folder for `traces.jsonl` (one line per fact, for resuming) and `config.json`.
        groups: token groups to trace (None: all of `GROUPS`); tracing only "last_subject"
            is about `n_tokens` times cheaper and is all `choose_edit_layer` needs.
        window, samples, noise, seed, batch_size: as in `trace_prompt`.
        noise_reference: subjects setting the noise std; None uses `facts` when it is a path,
            else the built-in list.
        noise_cache: a `NoiseCache` to reuse.
        progress: show a tqdm bar.
        method: "exact" (restored runs), or "atp" or "atp-logp": attribution-patching
            **estimates**, every kind of a fact from one corrupted forward and backward pass
            (`tracer.attribution`; every token group, `groups` then only selects the tokens
            kept). The method is part of the run's `config.json`, so an `out` folder holds
            one method only.
        workers: a `tracer.workers.WorkerPool` holding the same model: each known fact is
            traced (`trace_fact`) by a worker, and only this process appends to
            `traces.jsonl`, in completion order. This process still resolves the noise and
            checks which facts the model gets right (`known_mask`, 16 facts per forward
            pass, as without workers), so exactly the same facts are traced, `n` included:
            only the first `n` known facts are sent. The result equals the single-process
            run's (per-fact scores within float rounding, 1e-6). None: trace here.

    Returns:
        A `DatasetTraceResult`; its effects are `[n_facts, len(GROUPS), n_layers]` per kind.

    Raises:
        ValueError: `kinds` or `groups` empty or unknown, `n` not None or an integer >= 1,
            bad `noise`, `window`, `samples` or `batch_size` (`resolve_noise`,
            `prepare_runs`, `restore_scores`), facts `load_facts` refuses, an `out` folder
            holding a run with other settings, or an `out/traces.jsonl` with an unreadable
            line before its last one, or a line without `known_id` (`tracer.resume.read_jsonl`;
            a torn last line is not an error: it is cut and that fact traced again), or
            `workers` holding another model (`WorkerPool.check_model`).
        RuntimeError: from `WorkerPool.map`, a fact whose workers kept dying.

    Example:
        >>> ds = trace_dataset(model, "known_1000.json", kinds=("mlp",), n=20)
        >>> ds.n_facts, ds.n_dropped
    """
    kinds = tuple(kinds)
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds {kinds!r} must be a non-empty subset of {KINDS}")
    check_method(method)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n {n!r} must be None or an integer >= 1")
    groups = tuple(GROUPS if groups is None else groups)
    if not groups or any(g not in GROUPS for g in groups):
        raise ValueError(f"groups {groups!r} must be a non-empty subset of {GROUPS}")
    if noise_reference is None and isinstance(facts, (str, os.PathLike)):
        noise_reference = facts
    facts = load_facts(facts)
    if workers is not None:
        workers.check_model(model)
    noise_std = resolve_noise(model, noise, reference=noise_reference, cache=noise_cache)
    config = {"model": model_name(model), "kinds": list(kinds), "groups": list(groups), "window": window, "samples": samples, "noise_std": noise_std, "seed": seed, "method": method}
    if model_dtype(model) != torch.float32:  # fp32 folders (all written before dtype) carry no key
        config["dtype"] = str(model_dtype(model)).removeprefix("torch.")
    records: dict = {}
    jsonl = None
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        cfg_path = out / "config.json"
        if cfg_path.exists():
            old = json.loads(cfg_path.read_text())
            old.setdefault("method", "exact")  # folders written before attribution patching
            if {k: v for k, v in old.items() if k != "noise_std"} != {k: v for k, v in config.items() if k != "noise_std"} or not math.isclose(old.get("noise_std", -1), noise_std, rel_tol=1e-6):
                raise ValueError(f"out {str(out)!r} holds a run with other settings {old}; expected {config}. Use a fresh folder.")
        else:
            atomic_write_text(cfg_path, json.dumps(config, indent=1))
        jsonl = out / "traces.jsonl"
        records = _read_records(jsonl)
        if records:
            log.info("resuming: %d facts already in %s", len(records), jsonl)
    kept = [r for r in records.values() if r["correct"]]
    bar = tqdm(total=n if n is not None else len(facts), disable=not progress, desc="causal traces", unit="fact")
    bar.update(min(len(kept), bar.total))
    results: dict = dict(records)
    n_kept = len(kept)
    pending = [f for f in facts if str(f.known_id) not in results]
    if n is None:
        bar.update(len(results) - len(kept))

    def finish(rec: dict) -> None:  # the one place a line is kept and written
        results[str(rec["known_id"])] = rec
        if jsonl is not None:
            append_jsonl(jsonl, rec)
        bar.update(1 if (rec["correct"] or n is None) else 0)

    def checked() -> Iterator[Fact]:
        """The pending facts the model gets right, in order, up to `n` known in all; the
        others are finished here as dropped."""
        nonlocal n_kept
        chunk_size = 16
        for c in range(0, len(pending), chunk_size):
            if n is not None and n_kept >= n:
                return
            chunk = pending[c : c + chunk_size]
            mask = known_mask(model, chunk)  # one batched clean pass: wrong facts cost no tracing
            for fact, correct in zip(chunk, mask):
                if n is not None and n_kept >= n:
                    return
                if correct:
                    n_kept += 1
                    yield fact
                else:
                    finish(_fact_line(fact, False))

    trace = functools.partial(trace_fact, kinds=kinds, groups=groups, window=window, samples=samples,
                              noise_std=noise_std, seed=seed, batch_size=batch_size, method=method)
    if workers is None:
        for fact in checked():
            finish(trace(model, fact))
    else:
        for _, rec in workers.map(trace, checked()):  # completion order; each fact once
            finish(rec)
    bar.close()
    order = {str(f.known_id): i for i, f in enumerate(facts)}
    recs = sorted((r for r in results.values() if str(r["known_id"]) in order), key=lambda r: order[str(r["known_id"])])
    good = [r for r in recs if r["correct"]]
    if n is not None:
        good = good[:n]
        last = order[str(good[-1]["known_id"])] if len(good) == n else len(facts)
        recs = [r for r in recs if order[str(r["known_id"])] <= last]
    effects = {}
    for k in kinds:
        per = []
        for r in good:
            res = TraceResult(
                scores=_tensor(r["scores"][k]), low=r["low"], high=r["high"], prompt=r["prompt"],
                tokens=tuple(r["tokens"]), subject=tuple(r["subject_span"]), target=r.get("predicted", ""), target_id=-1,
                kind=k, window=window, samples=samples, noise_std=noise_std, method=method,
            )
            per.append(group_effects(res))
        n_layers = model.cfg.n_layers
        effects[k] = torch.stack(per) if per else torch.zeros(0, len(GROUPS), n_layers)
    dropped = sum(1 for r in recs if not r["correct"])
    log.info("kept %d facts the model gets right, dropped %d", len(good), dropped)
    return DatasetTraceResult(
        model_name=model_name(model),
        kinds=kinds,
        effects=effects,
        high=torch.tensor([r["high"] for r in good]),
        low=torch.tensor([r["low"] for r in good]),
        known_ids=tuple(r["known_id"] for r in good),
        n_tried=len(good) + dropped,
        n_dropped=dropped,
        window=window,
        samples=samples,
        noise_std=noise_std,
        method=method,
    )
