"""The main job on the offline default model: predict, trace a fact, edit it, undo the edit.

    python scripts/demo.py [--model gemma-3-270m] [--out results/demo]

Steps:
1. load the model (offline: Gemma-3-270m from its PyPI weight package) and print its top
   predictions for a few factual prompts;
2. causal-trace "The Eiffel Tower is located in the city of" (subject "Eiffel Tower") for
   the residual stream, MLP and attention, and save the heatmaps as HTML;
3. ROME-edit the fact to "Rome" and print before/after predictions for the prompt, a
   paraphrase and a neighbouring fact;
4. restore the edit and check the weights are back bit for bit.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "The mother tongue of Danielle Darrieux is",
    "Michael Jordan is a professional",
    "The capital of Japan is",
]


def top_k(model, prompt: str, k: int = 3) -> str:
    tokens = model.to_tokens(prompt)
    with torch.no_grad():
        probs = model(tokens)[0, -1].float().softmax(-1)
    p, i = probs.topk(k)
    return ", ".join(f"{model.tokenizer.decode([t])!r} {q:.3f}" for t, q in zip(i.tolist(), p.tolist()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--out", default="results/demo", help="folder for the trace heatmaps")
    parser.add_argument("--samples", type=int, default=10, help="noise samples per trace")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from tracer import load_model

    t0 = time.perf_counter()
    model = load_model(args.model)
    print(f"== 1. loaded {args.model} in {time.perf_counter() - t0:.1f} s "
          f"({model.cfg.n_layers} layers, {type(model).__name__})")
    for prompt in PROMPTS:
        print(f"  {prompt!r} -> {top_k(model, prompt)}")

    from tracer import plot_traces, trace_all

    prompt, subject = PROMPTS[0], "Eiffel Tower"
    t0 = time.perf_counter()
    results = list(trace_all(model, prompt, subject, samples=args.samples).values())  # resid, mlp, attn
    print(f"== 2. traced {prompt!r} in {time.perf_counter() - t0:.1f} s "
          f"(clean p={results[0].high:.3f}, corrupted p={results[0].low:.3f})")
    for res in results:
        ie = res.indirect_effect()
        tok, layer = divmod(int(ie.argmax()), ie.shape[1])
        print(f"  {res.kind:5s}: strongest effect {ie.max():.3f} at token {res.tokens[tok]!r} (#{tok}), layer {layer}")
    html = out / "trace.html"
    plot_traces(results).write_html(html)
    print(f"  heatmaps: {html}")

    from editor import EditRequest, rome

    request = EditRequest(prompt="{} is located in the city of", subject=subject, target_new="Rome", target_true="Paris")
    checks = [PROMPTS[0], "The Eiffel Tower, in the heart of the city of", "The Louvre is located in the city of"]
    before = {p: top_k(model, p) for p in checks}
    original = [b.mlp.W_out.clone() for b in model.blocks]
    t0 = time.perf_counter()
    edit = rome.edit(model, request)
    print(f"== 3. ROME edit at layer(s) {edit.layers} in {time.perf_counter() - t0:.1f} s: Eiffel Tower -> Rome")
    for p in checks:
        print(f"  {p!r}\n     before: {before[p]}\n     after:  {top_k(model, p)}")
    edit.restore()
    exact = all(torch.equal(b.mlp.W_out, w) for b, w in zip(model.blocks, original))
    print(f"== 4. restored; weights identical to the original: {exact}")
    if not exact:
        raise SystemExit("restore was not exact")


if __name__ == "__main__":
    main()
