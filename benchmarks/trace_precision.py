"""Reduced-precision causal tracing against an fp32 run of the same facts (a script, not a test).

Issue 15's bounds for a reduced-precision mode: max |Δscore| <= 0.02 against fp32 over 20 known
facts (every kind, token and layer), and the same `choose_edit_layer` answer on 100 known facts.
The fp32 side is an existing `trace_dataset` folder (`--reference`, e.g. the whole-known_1000
run in docs/results/fig2-known1000), read back and never written; the reduced-precision side
traces the reference's first known facts with the reference's own settings and noise std
(`NoiseScale`), so the two differ only in the dtype. Speed is `benchmarks/trace_speed.py --dtype`'s job.

Run:
    python -m benchmarks.trace_precision --reference docs/results/fig2-known1000 \\
        --facts ../shared/data/known_1000.json --out docs/results/trace-bf16

Prints, and writes to `<out>/precision.json`: per kind the max and mean |Δscore| over the
first `--n` known facts, the number of facts whose argmax cell moved, and both layer choices
(with their curves) on the first `--layer-n` known facts. The traces go to `<out>/scores` and
`<out>/layer`, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tracer import load_model
from tracer.dataset import load_facts, read_run, run_options, trace_dataset
from tracer.files import atomic_write_text
from tracer.layer import choose_from_result
from tracer.model import cast_model


def compare_scores(reference: dict, lines: dict, kinds) -> dict:
    """Per kind: max and mean |Δscore| and moved argmax cells over the facts in `lines`.

    Args:
        reference, lines: `traces.jsonl` lines keyed by known_id (`scores[kind]` is
            `[n_tokens, n_layers]`, probabilities of the target).
        kinds: the kinds to compare.

    Returns:
        `{kind: {"max_abs": float, "mean_abs": float, "argmax_moved": int, "n_facts": int}}`,
        plus `"high_max_abs"` and `"low_max_abs"` over the same facts: those both sides
        traced (a fact one precision gets wrong has no scores there).
    """
    ids = [i for i, r in lines.items() if r["correct"] and i in reference and reference[i]["correct"]]
    out = {}
    for k in kinds:
        diffs, moved = [], 0
        for i in ids:
            a, b = torch.tensor(reference[i]["scores"][k]), torch.tensor(lines[i]["scores"][k])
            diffs.append((a - b).abs().flatten())
            moved += int(a.argmax() != b.argmax())
        d = torch.cat(diffs) if diffs else torch.zeros(0)
        out[k] = {"max_abs": float(d.max()) if len(d) else float("nan"), "mean_abs": float(d.mean()) if len(d) else float("nan"),
                  "argmax_moved": moved, "n_facts": len(ids)}
    for side in ("high", "low"):
        out[f"{side}_max_abs"] = max((abs(reference[i][side] - lines[i][side]) for i in ids), default=float("nan"))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", required=True, help="an fp32 trace_dataset folder (config.json, traces.jsonl)")
    p.add_argument("--facts", required=True, help="the known_1000.json the reference traced")
    p.add_argument("--out", required=True, help="folder for the reduced-precision traces and precision.json")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--n", type=int, default=20, help="known facts whose scores are compared (every kind)")
    p.add_argument("--layer-n", type=int, default=100, help="known facts for the edit-layer choice (mlp, last subject token)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    ref_dir, out = Path(args.reference), Path(args.out)
    try:
        cfg, reference = read_run(ref_dir)
    except ValueError as err:
        raise SystemExit(f"--reference: {err}") from err
    if cfg.get("dtype", "float32") != "float32" or cfg.get("method", "exact") != "exact":
        raise SystemExit(f"--reference {ref_dir} is not an exact fp32 run: {cfg}")
    facts = load_facts(args.facts)
    known = [f for f in facts if reference.get(str(f.known_id), {}).get("correct")]  # fp32's known facts, in file order
    if len(known) < max(args.n, args.layer_n):  # never trace into the reference: it is only read
        raise SystemExit(f"--reference {ref_dir} holds {len(known)} known facts; --n {args.n} and --layer-n "
                         f"{args.layer_n} need at most that many")
    opts = run_options(cfg)
    model = load_model(cfg["model"])
    # the fp32 choice on the first --layer-n known facts, read back from the reference (no tracing)
    ref_layer = choose_from_result(trace_dataset(model, known[: args.layer_n], out=ref_dir, progress=False, **opts))
    cast_model(model, args.dtype)
    kinds = opts["kinds"]
    # the same facts in the reduced dtype (one it gets wrong is dropped there, and counted)
    trace_dataset(model, known[: args.n], out=out / "scores", **opts)
    low = trace_dataset(model, known[: args.layer_n], out=out / "layer", **opts | {"kinds": ("mlp",), "groups": ("last_subject",)})
    low_layer = choose_from_result(low)

    report = {
        "dtype": args.dtype, "reference": str(ref_dir), "noise_std": cfg["noise_std"],
        "scores": compare_scores(reference, read_run(out / "scores")[1], kinds),
        "layer": {"n_facts": low.n_facts, "n_facts_fp32": ref_layer.n_facts, "fp32": ref_layer.layer, args.dtype: low_layer.layer, "same": ref_layer.layer == low_layer.layer,
                  "fp32_curve": ref_layer.curve, f"{args.dtype}_curve": low_layer.curve},
    }
    atomic_write_text(out / "precision.json", json.dumps(report, indent=1))
    for k in kinds:
        s = report["scores"][k]
        print(f"{k:5s}: max |Δscore| {s['max_abs']:.4f}, mean {s['mean_abs']:.5f}, argmax cell moved in {s['argmax_moved']} of {s['n_facts']} facts")
    print(f"high max |Δ| {report['scores']['high_max_abs']:.4f}, low max |Δ| {report['scores']['low_max_abs']:.4f}")
    if report["scores"][kinds[0]]["n_facts"] < args.n or low.n_facts < args.layer_n:
        print(f"note: {args.dtype} got some of fp32's known facts wrong; compared {report['scores'][kinds[0]]['n_facts']} "
              f"of {args.n} and chose the layer on {low.n_facts} of {args.layer_n}")
    print(f"edit layer on {low.n_facts} facts: fp32 {ref_layer.layer} (margin {ref_layer.margin:.4f}), "
          f"{args.dtype} {low_layer.layer} (margin {low_layer.margin:.4f}): {'same' if report['layer']['same'] else 'DIFFERENT'}")
    return report


if __name__ == "__main__":
    main()
