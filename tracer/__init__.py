"""romelens tracer: model loading, the hook surface, prompt helpers and causal tracing.

Example:
    >>> from tracer import load_model, locate_subject
    >>> model = load_model("gemma-3-270m")
    >>> locate_subject(model, "The Eiffel Tower is located in the city of", "Eiffel Tower").subject
    (2, 4)
"""

from tracer.hooks import EMBED, KINDS, hook_name
from tracer.model import (
    TL_API,
    ModelLoadError,
    final_logits,
    final_resid,
    run_until,
    load_model,
    model_device,
    model_name,
    mlp_output_delta,
    prepare_model,
    unembed_positions,
    w_out,
    weights_hash,
)
from tracer.prompts import PromptTokens, TargetProbs, encode, locate_subject, target_ids, target_probs

__all__ = [
    "EMBED",
    "KINDS",
    "TL_API",
    "ModelLoadError",
    "PromptTokens",
    "TargetProbs",
    "encode",
    "final_logits",
    "final_resid",
    "run_until",
    "hook_name",
    "load_model",
    "locate_subject",
    "mlp_output_delta",
    "model_device",
    "model_name",
    "prepare_model",
    "target_ids",
    "target_probs",
    "unembed_positions",
    "w_out",
    "weights_hash",
]

# Causal tracing (tracer/trace.py and friends); its corruption and restoration as
# TransformerLens hooks (tracer/patching.py, docs/interop.md).
from tracer.dataset import DatasetTraceResult, trace_dataset  # noqa: E402
from tracer.layer import LayerChoice, choose_edit_layer  # noqa: E402
from tracer.noise import NoiseCache, NoiseScale  # noqa: E402
from tracer.patching import corruption_hooks, restoration_hooks  # noqa: E402
from tracer.result import TraceResult, plot_traces  # noqa: E402
from tracer.trace import trace_all, trace_prompt  # noqa: E402

__all__ += [
    "DatasetTraceResult",
    "LayerChoice",
    "NoiseCache",
    "NoiseScale",
    "TraceResult",
    "choose_edit_layer",
    "corruption_hooks",
    "plot_traces",
    "restoration_hooks",
    "trace_all",
    "trace_dataset",
    "trace_prompt",
]
