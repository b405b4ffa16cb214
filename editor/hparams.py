"""Hyperparameters for ROME, MEMIT and FT-L, with presets by model name.

Presets reproduce the papers' settings for GPT-2 medium / large / XL and GPT-J (from
kmeng01/rome `hparams/ROME/*.json` and kmeng01/memit `hparams/MEMIT/*.json`), plus a
preset for the offline default Gemma-3-270m. Any other TransformerLens model gets the
papers' defaults with the edit layer from `default_layer`: a choice cached by
`tracer.choose_edit_layer` (causal tracing), or a new one, announced with its cost. Pass a
`layer` (or hparams) to skip it. Use `dataclasses.replace` for sweeps.

The papers' `v_loss_layer` is always the last layer, so our loss is read at the model's
output and there is no such field. The statistics corpus and token count are not part of
the algorithm's hyperparameters except for `mom2_n_tokens`; the corpus is an argument.

Example:
    >>> from dataclasses import replace
    >>> hp = rome_hparams("gpt2-xl"); hp.layer
    17
    >>> replace(hp, v_lr=0.1).v_lr
    0.1
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

from editor.checks import (
    check_bool,
    check_context_lengths,
    check_layer,
    check_layers,
    check_positive_int,
    check_prompts,
    check_real,
)

log = logging.getLogger(__name__)


ROME_KEYS = ("r-rome", "original", "mean-key-shift")
KL_POSITIONS = ("last", "subject")
EARLY_STOP_ON = ("nll", "loss")


def one_of(field: str, value, allowed: tuple[str, ...]) -> None:
    """Raise `ValueError` naming `field` unless `value` is one of `allowed`.

    Raises:
        ValueError: `value` is not in `allowed`.
    """
    if value not in allowed:
        raise ValueError(f"{field} {value!r} must be one of {allowed}")


#: the order hparams print in: the edited layer(s) first, then as the papers list them
_REPR_ORDER = ("layer", "layers", "v_num_grad_steps", "v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor",
               "kl_prompts", "early_stop_nll", "context_lengths")


@dataclass(frozen=True, kw_only=True, repr=False)
class _ValueOptimisation:
    """The value-optimisation fields ROME and MEMIT share, with the same defaults (ROME Eq. 4;
    documented in `ROMEHParams`), and the repr every hparams class prints."""

    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    kl_factor: float = 0.0625
    kl_prompts: tuple[str, ...] = ("{} is a",)
    early_stop_nll: float = 0.05

    def __repr__(self) -> str:
        names = [f.name for f in fields(self)]
        order = [n for n in _REPR_ORDER if n in names] + [n for n in names if n not in _REPR_ORDER]
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in order)})"


@dataclass(frozen=True, kw_only=True, repr=False)
class ROMEHParams(_ValueOptimisation):
    """ROME (Meng et al. 2022, Sec. 3 and App. E).

    Attributes:
        layer: block whose `W_out` is edited, `0 <= layer < n_layers` (checked at edit time;
            negative indices are refused). The last block is refused for a prompt whose
            subject does not end it: its MLP output cannot reach the prediction position.
        v_num_grad_steps: Adam steps optimising the value delta.
        v_lr: Adam learning rate for the value delta.
        v_weight_decay: weight on `||δ|| / ||v||²`, which keeps the delta small.
        clamp_norm_factor: `||δ||` is clamped to this times the norm of the original value.
        kl_factor: weight of the KL term on the `kl_prompts` ("essence drift").
        kl_prompts: prompts with `{}` for the subject whose next-token distribution is kept.
        early_stop_nll: stop once the mean NLL of the new target falls below this.
        context_lengths: `(length, n)` pairs: `n` self-generated prefixes of `length` tokens
            each; `k*` and the loss are averaged over them and the bare prompt.
        mom2_n_tokens: tokens of text for the key covariance `C`. Fewer than the model's
            `d_mlp` are refused (ValueError before anything is computed, and again if the corpus
            ends early): `C` would be singular (on Gemma-3-270m 1,000 tokens gave
            `‖ΔW‖ = 161 ‖W_out‖` and broke unrelated facts). Not regularised, refused.
            **Not the papers' sample count.** ROME's `mom2_n_samples = 100000` counts
            Wikipedia *samples* (texts cut to the model's context), tens of millions of
            tokens; ours counts *tokens* (every position of the corpus text, here
            WikiText-2 test, ~292k tokens on Gemma-3-270m's tokenizer), so 100,000 is a few
            hundred times fewer positions than the paper's `C` saw.
        mom2_adjustment: use `C⁻¹ k*` as the update direction (False: `k*` itself).
        key: which key the rank-one update is solved for, and the value it maps to
            (`editor.rome.right_vector`; `δ` is the optimised change of the raw MLP output
            at the bare prompt, `k₀` the bare prompt's key, `k*` the key averaged over the
            context templates):
            - "original": kmeng01/rome's code: `v = δ / (k₀·u)`, so `k₀ ↦ W k₀ + δ`
              (the direction `u` comes from `k*`, the solve from `k₀`);
            - "r-rome": Gupta et al. 2024 ("Rebuilding ROME"), as their code and EasyEdit
              implement it: `v = (W k₀ + δ - W k*) / (k*·u)`, so `k* ↦ W k₀ + δ`, the
              optimised value `v*` (ROME Eq. 2 with `k*` throughout);
            - "mean-key-shift" (the default; called "r-rome" before 2026-11-29):
              `v = δ / (k*·u)`, so `k* ↦ W k* + δ` (the averaged key keeps its own value,
              shifted by `δ`). Chosen on CounterFact's validation slice (dev 600-697,
              Gemma-3-270m, clamp 0.75): single edits ES/PS/NS 100/86.7/74.5 against
              100/85.2/75.0 ("original") and 98/86.2/75.1 ("r-rome"); after 50 sequential
              edits 96/90/70 against 92/87/73.6 and 86/88/72.2, perplexity 31.55 against
              31.67 and 31.94; all within the 95% CIs (docs/benchmarks.md).
        kl_position: where the essence-drift KL (ROME Eq. 4) is read on the `kl_prompts`:
            "last" (the prompt's last token, predicting what follows "{subject} is a", as the
            paper's equation writes it) or "subject" (the subject's last token, where the
            delta is added, as kmeng01/rome's code reads it).
        early_stop_on: what `early_stop_nll` is compared with: "nll" (the mean NLL of the
            new target) or "loss" (the total loss, NLL + KL + weight decay, as kmeng01/rome
            stops at 5e-2).

    Raises:
        ValueError: an unknown `key`, `kl_position` or `early_stop_on`; a negative or
            non-int `layer`; a non-bool `mom2_adjustment`; or an optimisation field out of
            range (a step count or token count < 1, a non-positive `v_lr` or
            `clamp_norm_factor`, a negative `v_weight_decay` or `kl_factor`, a non-finite
            number, `kl_prompts` without one `{}` each, bad `context_lengths`).
    """

    layer: int
    clamp_norm_factor: float = 4.0
    context_lengths: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    mom2_n_tokens: int = 100_000
    mom2_adjustment: bool = True
    key: Literal["r-rome", "original", "mean-key-shift"] = "mean-key-shift"
    kl_position: Literal["last", "subject"] = "last"
    early_stop_on: Literal["nll", "loss"] = "nll"

    def __post_init__(self):
        one_of("key", self.key, ROME_KEYS)
        one_of("kl_position", self.kl_position, KL_POSITIONS)
        one_of("early_stop_on", self.early_stop_on, EARLY_STOP_ON)
        _set(self, layer=check_layer(self.layer, "layer"), mom2_adjustment=check_bool(self.mom2_adjustment, "mom2_adjustment"))
        _check_optimisation(self)


@dataclass(frozen=True, kw_only=True, repr=False)
class MEMITHParams(_ValueOptimisation):
    """MEMIT (Meng et al. 2022b).

    Attributes:
        layers: the edited blocks, a contiguous increasing range of indices `>= 0` (checked
            here; `< n_layers` at edit time); the target `z` lives at the last. A top layer
            that is the last block is refused for prompts whose subject does not end them.
        v_num_grad_steps, v_lr, v_weight_decay, kl_factor, kl_prompts, early_stop_nll,
            context_lengths: as in `ROMEHParams`, for optimising `z`.
        clamp_norm_factor: `||δ||` clamped to this times the norm of the residual at the
            last layer.
        mom2_update_weight: λ in `Δ = R Kᵀ (λC + K Kᵀ)⁻¹` (MEMIT Eq. 14); presets without
            one get `scaled_lambda(d_mlp)` when built from a model.
        mom2_n_tokens: tokens (not the papers' text samples; see `ROMEHParams`) of text for
            `C`; fewer than `d_mlp` are refused, as in `ROMEHParams`.
        z_batch_size: requests whose `z` are optimised together in one batch.
        spread: how the layers share the change. "residual" (the paper): one delta at the
            last layer gives `z`, and each layer is asked for an equal share of the
            remaining residual change `z - h`. "joint": one raw-output delta per layer is
            optimised jointly against the same loss (weight decay spreads it), each layer
            is asked for its own delta, and the last layer also takes what the earlier
            ones fell short of `z` (the residual all the deltas produce). "joint" suits
            models that normalise the MLP output before the residual (Gemma), where an
            equal residual share may be out of a layer's reach. In "joint" mode
            `clamp_norm_factor` bounds each layer's delta against that layer's raw MLP
            output norm instead of the last layer's residual norm.

    Raises:
        ValueError: an unknown `spread`; `layers` empty, with a negative or non-int entry,
            or not a contiguous increasing range; a non-positive or non-finite
            `mom2_update_weight`; `z_batch_size` < 1; or an optimisation field out of range
            (as in `ROMEHParams`).
    """

    layers: tuple[int, ...]
    clamp_norm_factor: float = 0.75
    context_lengths: tuple[tuple[int, int], ...] = ((10, 5),)
    mom2_update_weight: float = 15000.0
    mom2_n_tokens: int = 100_000
    z_batch_size: int = 8
    spread: Literal["residual", "joint"] = "residual"

    def __post_init__(self):
        one_of("spread", self.spread, ("residual", "joint"))
        layers = check_layers(self.layers, "layers")
        _set(self, layers=layers, mom2_update_weight=check_real(self.mom2_update_weight, "mom2_update_weight", positive=True),
             z_batch_size=check_positive_int(self.z_batch_size, "z_batch_size"))
        _check_optimisation(self)
        if layers != tuple(range(layers[0], layers[-1] + 1)):
            raise ValueError(
                f"layers {tuple(self.layers)} must be a contiguous increasing range, e.g. "
                f"{tuple(range(min(layers), max(layers) + 1))}: MEMIT spreads the update over consecutive blocks"
            )
        check_positive_int(self.mom2_n_tokens, "mom2_n_tokens")


@dataclass(frozen=True, kw_only=True)
class FTHParams:
    """Constrained fine-tuning of one `W_out` (FT-L, Zhu et al. 2020, as in ROME's baseline).

    Attributes:
        layer: block whose `W_out` is fine-tuned, `0 <= layer < n_layers`. The last block is
            allowed: FT-L trains on the keys at the prediction positions themselves.
        num_steps: Adam steps.
        lr: Adam learning rate.
        norm_constraint: L∞ bound on every entry of the delta (clamped after each step).
        early_stop_nll: stop once the NLL of the new target falls below this (nats).

    Raises:
        ValueError: a negative or non-int `layer`, `num_steps` < 1, a non-positive `lr` or
            `norm_constraint`, or a non-finite number.
    """

    layer: int
    num_steps: int = 25
    lr: float = 5e-4
    norm_constraint: float = 5e-4
    early_stop_nll: float = 0.01

    def __post_init__(self):
        _set(self, layer=check_layer(self.layer, "layer"), num_steps=check_positive_int(self.num_steps, "num_steps"),
             lr=check_real(self.lr, "lr", positive=True),
             norm_constraint=check_real(self.norm_constraint, "norm_constraint", positive=True),
             early_stop_nll=check_real(self.early_stop_nll, "early_stop_nll"))


def _set(hp, **values) -> None:
    """Store checked, normalised values (a numpy int as an int, an int as a float where a
    float is meant) on a frozen hparams object."""
    for name, value in values.items():
        object.__setattr__(hp, name, value)


def _check_optimisation(hp) -> None:
    """The value-optimisation fields ROME and MEMIT share: a command-line string such as
    "0.5" or "False", a negative clamp or a step count of 0 is refused here, before any run."""
    _set(
        hp,
        v_num_grad_steps=check_positive_int(hp.v_num_grad_steps, "v_num_grad_steps"),
        v_lr=check_real(hp.v_lr, "v_lr", positive=True),
        v_weight_decay=check_real(hp.v_weight_decay, "v_weight_decay", minimum=0.0),
        clamp_norm_factor=check_real(hp.clamp_norm_factor, "clamp_norm_factor", positive=True),
        kl_factor=check_real(hp.kl_factor, "kl_factor", minimum=0.0),
        kl_prompts=check_prompts(hp.kl_prompts, "kl_prompts"),
        early_stop_nll=check_real(hp.early_stop_nll, "early_stop_nll"),
        context_lengths=check_context_lengths(hp.context_lengths),
        mom2_n_tokens=check_positive_int(hp.mom2_n_tokens, "mom2_n_tokens"),
    )


def _norm(name: str) -> str:
    return name.split("/")[-1].lower()


# The papers' settings (kmeng01/rome hparams/ROME, kmeng01/memit hparams/MEMIT).
ROME_PRESETS: dict[str, ROMEHParams] = {
    "gpt2-medium": ROMEHParams(layer=8, clamp_norm_factor=3.0),
    "gpt2-large": ROMEHParams(layer=12),
    "gpt2-xl": ROMEHParams(layer=17),
    "gpt-j-6b": ROMEHParams(layer=5),
    # Gemma-3-270m (18 layers): layer 4, chosen by tracer.choose_edit_layer over 100 known
    # facts (MLP AIE at the last subject token 0.091 +- 0.022 at layer 4; layers 3-6 within
    # the CI; docs/tracing.md). A one-fact sweep ("The Eiffel Tower -> Rome" at layers 3-6)
    # edits the fact at every layer (prompt p(Rome) > 0.96); the neighbour "The Louvre ...
    # city of" keeps Paris best at 3 (p(Rome) 0.005) and 4 (0.085), less so at 5 (0.17), and
    # fails at 6 (0.54); docs/editing.md. Five generated templates (not 20) and 25 steps
    # keep a CPU edit short; it converges in 5-7 steps. clamp_norm_factor 0.75 (not the
    # papers' 4): Gemma normalises the MLP output (ln2_post) before the residual, so a delta
    # several times the raw output (|v| ~ 3 at layer 4) also swamps the raw outputs of
    # neighbouring subjects that share part of the key. Chosen on the validation slice (dev
    # records 600-697, apart from the reported 0-499): clamp 1 gave ES 100, PS 93.4, NS 72.7
    # (unedited 79.0, a drop of 6.3 > 5); 0.75 gave ES 100, PS 86.7, NS 74.5; 0.5 gave ES 90.8,
    # PS 67.9. key stays "mean-key-shift": on the same slice it had the best ES/PS single and
    # after 50 sequential edits, within the CIs of "original" and "r-rome" (docs/benchmarks.md).
    "gemma-3-270m": ROMEHParams(layer=4, v_num_grad_steps=25, context_lengths=((10, 5),), clamp_norm_factor=0.75),
}

MEMIT_PRESETS: dict[str, MEMITHParams] = {
    "gpt2-xl": MEMITHParams(layers=(13, 14, 15, 16, 17), v_lr=0.8, v_weight_decay=0.1, mom2_update_weight=20000.0),
    "gpt-j-6b": MEMITHParams(layers=(3, 4, 5, 6, 7, 8), v_num_grad_steps=25),
    # Gemma-3-270m: five layers around the ROME layer 4, the traced peak region 2-6
    # (GPT-J's 3-8 spans its ROME layer 5). λ is GPT-J's 15000 scaled to Gemma's d_mlp
    # (see `scaled_lambda`): with GPT-J's own 15000 a typical key's update reaches only
    # ~0.2-0.35 of the wanted change and 8 CounterFact edits moved 1 of 8 targets past the
    # true object; at 1875, 6 of 8 (docs/editing.md).
    # spread "joint" with each layer's delta clamped to 0.5 of its raw MLP output: with the
    # paper's equal residual shares, Gemma's post-MLP norms kept layers 2-5 from moving the
    # residual toward z (ES 62 on a batch of 100). On CounterFact dev 0-15 as one batch of 16:
    # ES/PS/NS 100/100/69 at clamp 1, 100/100/77 at 0.5, unedited NS 82 (docs/editing.md).
    # Dev 0-99 as one batch of 100: ES 100, PS 94.5, NS 75.6 (unedited 81.9), perplexity +2.6%.
    "gemma-3-270m": MEMITHParams(layers=(2, 3, 4, 5, 6), v_num_grad_steps=25, mom2_update_weight=1875.0,
                                 spread="joint", clamp_norm_factor=0.5),
}

FT_PRESETS: dict[str, FTHParams] = {
    "gpt2-xl": FTHParams(layer=0),
    "gpt-j-6b": FTHParams(layer=21),
    # the ROME layer, with the paper's GPT-2 XL bound and lr (5e-4). A 10x looser bound
    # (5e-3) edited as well but broke the model: CounterFact dev 0-99 NS 4.2, perplexity
    # 30.95 -> 57.8; at 5e-4, ES 100, PS 77, NS 48, perplexity 31.2 (docs/benchmarks.md)
    "gemma-3-270m": FTHParams(layer=4),
}


def _fallback_layer(n_layers: int) -> int:
    """The paper's relative depth (GPT-2 XL: layer 17 of 48), for when tracing is impossible."""
    return max(0, min(n_layers - 1, round(n_layers * 17 / 48)))


def default_layer(model, *, facts=None, n: int = 100, cache_dir=None) -> int:
    """The edit layer for a model without a preset: the cached causal-tracing choice, or a new one.

    The rule (README, "What happens for a model with no preset"):

    1. the choice cached for these weights (the hash from before any romelens edit), which
       any earlier `tracer.choose_edit_layer(model, facts, n=...)` run wrote, whatever its
       `n`: it is read from disk, never kept in memory;
    2. else `tracer.choose_edit_layer` over `n` known facts (the paper's defaults: window
       10, 10 noise samples), announced first by a WARNING with its estimated cost and how
       to skip it, with a progress bar; its choice is cached;
    3. else (no facts file, or tracing failed) the paper's relative depth, 17/48 of the
       layers, with a warning; not cached.

    Args:
        model: the model (not a name: the choice depends on its weights).
        facts: known_1000.json path; default `known_1000.json` in `$ROMELENS_DATA`, else in
            the project's data folder (`tracer.dataset.default_data_dir()`, `../shared/data`).
        n: known facts to trace.
        cache_dir: cache root of the choice and of the noise statistics tracing measures
            (`<root>/edit_layer`, `<root>/noise`); None: `tracer.offline.cache_dir()`; "none"
            neither reads nor writes either.

    Returns:
        The block index to edit, `0 <= layer < n_layers`. Never raises for a tracing
        failure: it falls back to the relative depth (rule 3).
    """
    from editor.common import base_hash  # noqa: PLC0415
    from tracer import layer as tlayer  # noqa: PLC0415  (heavy, only when needed)
    from tracer.dataset import default_data_dir  # noqa: PLC0415
    from tracer.model import model_name  # noqa: PLC0415
    from tracer.noise import NoiseCache  # noqa: PLC0415
    from tracer.offline import cache_root  # noqa: PLC0415

    n_layers = model.cfg.n_layers
    name = model_name(model)
    bh = base_hash(model)
    cached = tlayer.cached_layer_choice(model, model_hash=bh, cache_dir=cache_dir)
    if cached is not None:
        log.info("edit layer %d for %s from %s (%s facts)", cached["layer"], name, cached["path"], cached.get("n_facts", "?"))
        return int(cached["layer"])
    skip = (
        "pass hparams with a layer (ROMEHParams(layer=...), MEMITHParams(layers=...), FTHParams(layer=...); "
        "--layer or --hparam layer=... on the command line), or run tracer.choose_edit_layer(model, facts) "
        "once: its choice is cached for these weights"
    )
    path = Path(facts) if facts is not None else default_data_dir() / "known_1000.json"
    if not path.exists():
        layer = _fallback_layer(n_layers)
        log.warning("no preset for %s and no known-facts file at %s to choose the edit layer by causal tracing; "
                    "using layer %d (17/48 of the depth, as GPT-2 XL's preset). To choose it properly, %s",
                    name, path, layer, skip)
        return layer
    minutes = tlayer.estimate_minutes(model, n)
    log.warning("no preset for %s: choosing the edit layer by causal tracing over %d known facts from %s "
                "(~%.0f min on this machine); to skip this, %s", name, n, path, max(minutes, 1.0), skip)
    try:
        # the paper's tracing defaults: known facts, window 10, 10 noise samples
        # cached once, below, under the unedited weights' hash (not also under the current weights')
        # the noise statistics under the caller's cache root as well
        root = cache_root(cache_dir)
        noise_cache = NoiseCache(root=root / "noise") if root else NoiseCache(use_disk=False)
        choice = tlayer.choose_edit_layer(model, str(path), n=n, window=10, samples=10, cache_dir="none",
                                          noise_cache=noise_cache)
    except Exception as err:  # noqa: BLE001  (any failure -> documented fallback)
        layer = _fallback_layer(n_layers)
        log.warning("choosing the edit layer failed (%s: %s); using layer %d (17/48 of the depth)", type(err).__name__, err, layer)
        return layer
    layer = int(choice.layer)
    log.warning("edit layer %d for %s, from causal tracing over %d facts", layer, name, getattr(choice, "n_facts", n))
    tlayer.save_layer_choice(model, choice, model_hash=bh, cache_dir=cache_dir)  # keyed on the unedited weights
    return layer


def _lookup(presets: dict, model_or_name):
    """The preset for a model or model name, or None."""
    name = model_or_name if isinstance(model_or_name, str) else str(getattr(model_or_name.cfg, "model_name", ""))
    return presets.get(_norm(name))


def _preset(presets: dict, method: str, model_or_name):
    """The preset of a model (or model name), None for a model without one; a bare name without one raises."""
    name = model_or_name if isinstance(model_or_name, str) else str(getattr(model_or_name.cfg, "model_name", ""))
    if _norm(name) in presets:
        return presets[_norm(name)]
    if isinstance(model_or_name, str):
        raise ValueError(f"model {name!r} has no {method} preset ({sorted(presets)}); pass the model instead")
    return None


def rome_hparams(model_or_name, *, layer: int | None = None, cache_dir=None) -> ROMEHParams:
    """Preset for a model (or model name); other models: paper defaults at `default_layer`.

    With `layer`, that layer replaces the preset's, and a model without a preset gets the
    paper's defaults there: no causal tracing runs. `cache_dir` is `default_layer`'s (the
    editors pass their own).

    Args:
        model_or_name: a TransformerLens model, or a preset's model name.
        layer: the edit layer; None keeps the preset's (or runs `default_layer`).
        cache_dir: the cache root `default_layer` reads and writes.

    Returns:
        A `ROMEHParams`.

    Raises:
        ValueError: a model name without a preset (pass the model), or a negative `layer`.
    """
    if layer is not None:
        return replace(_lookup(ROME_PRESETS, model_or_name) or ROMEHParams(layer=layer), layer=layer)
    return _preset(ROME_PRESETS, "ROME", model_or_name) or ROMEHParams(layer=default_layer(model_or_name, cache_dir=cache_dir))


def memit_hparams(model_or_name, *, layer: int | None = None, cache_dir=None) -> MEMITHParams:
    """Preset for a model; other models: five layers ending at `default_layer`, λ scaled to
    the model's d_mlp, and, for models that normalise the MLP output before the residual
    (Gemma-2/3 style), the Gemma-3-270m preset's `spread="joint"` with clamp 0.5.

    With `layer`, the edited range ends there (a preset keeps its number of layers) and no
    causal tracing runs. `cache_dir` is `default_layer`'s.

    Args:
        model_or_name: a TransformerLens model, or a preset's model name.
        layer: the top edited layer; None keeps the preset's (or runs `default_layer`).
        cache_dir: the cache root `default_layer` reads and writes.

    Returns:
        A `MEMITHParams`.

    Raises:
        ValueError: a negative `layer`, or a model name without a MEMIT preset.
    """
    if layer is not None and layer < 0:
        raise ValueError(f"layer {layer} must be >= 0")
    hp = _lookup(MEMIT_PRESETS, model_or_name) if layer is not None else _preset(MEMIT_PRESETS, "MEMIT", model_or_name)
    if hp is not None:
        if layer is None:
            return hp
        return replace(hp, layers=tuple(range(max(0, layer - len(hp.layers) + 1), layer + 1)))
    if isinstance(model_or_name, str):
        raise ValueError(f"model {model_or_name!r} has no MEMIT preset ({sorted(MEMIT_PRESETS)}); pass the model instead")
    from tracer.model import mlp_post_norm  # noqa: PLC0415

    model = model_or_name
    top = default_layer(model, cache_dir=cache_dir) if layer is None else layer
    hp = MEMITHParams(layers=tuple(range(max(0, top - 4), top + 1)), mom2_update_weight=scaled_lambda(model.cfg.d_mlp))
    if mlp_post_norm(model, top) is not None:
        hp = replace(hp, spread="joint", clamp_norm_factor=0.5)
    return hp


GPTJ_D_MLP = 16384


def scaled_lambda(d_mlp: int, base: float = 15000.0) -> float:
    """GPT-J's MEMIT λ (15000 at d_mlp 16,384) scaled to a model with `d_mlp` MLP neurons.

    For keys drawn like the statistics `C`, `E[kᵀ C⁻¹ k] = d_mlp`, so how far one edit's
    update reaches towards its target, `kᵀ(λC)⁻¹k / (1 + kᵀ(λC)⁻¹k)`, depends on
    `d_mlp / λ`. Keeping that ratio at GPT-J's keeps the papers' balance between the edits
    and the preserved keys on a smaller MLP (MEMIT Eq. 14's λ).

    Args:
        d_mlp: the model's MLP width (neurons).
        base: λ at GPT-J's d_mlp 16,384.

    Returns:
        `base * d_mlp / 16384`.

    Example:
        >>> scaled_lambda(2048)   # Gemma-3-270m
        1875.0
    """
    return base * d_mlp / GPTJ_D_MLP


def ft_hparams(model_or_name, *, layer: int | None = None, cache_dir=None) -> FTHParams:
    """Preset for a model; other models: FT-L at `default_layer` (with `cache_dir`). With
    `layer`, that layer (no causal tracing).

    Returns:
        An `FTHParams`.

    Raises:
        ValueError: a model name without an FT-L preset (pass the model), or a negative `layer`.
    """
    if layer is not None:
        return replace(_lookup(FT_PRESETS, model_or_name) or FTHParams(layer=layer), layer=layer)
    return _preset(FT_PRESETS, "FT-L", model_or_name) or FTHParams(layer=default_layer(model_or_name, cache_dir=cache_dir))
