"""Command line: causal trace of one prompt, or of a fact set with the edit-layer choice.

Examples:
    python -m tracer --model gemma-3-270m --prompt "The Eiffel Tower is located in the city of" \\
        --subject "Eiffel Tower" --kind all --out trace.html
    python -m tracer --model gemma-3-270m --facts ../shared/data/known_1000.json --n 50 --out runs/known50
    python -m tracer --facts ../shared/data/known_1000.json --out runs/known --ray local --workers 2
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tracer.attribution import METHODS, estimate_label, is_estimate
from tracer.hooks import KINDS
from tracer.model import DTYPES, add_model_args
from tracer.workers import add_ray_args


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tracer", description="Causal tracing (Meng et al. 2022) on TransformerLens models.")
    add_model_args(p)
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="trace in this precision: the model loads in fp32, then is cast (docs/tracing.md; "
                   "bfloat16 is the measured reduced-precision mode)")
    one = p.add_argument_group("single prompt")
    one.add_argument("--prompt", help="the prompt, subject included")
    one.add_argument("--subject", help="the subject to corrupt")
    one.add_argument("--target", help="answer to score (default: the clean top-1 token)")
    one.add_argument("--kind", default="all", choices=(*KINDS, "all"), help="state to restore (default: all)")
    one.add_argument("--severed", choices=("mlp", "attn"), help="freeze this sublayer at later layers (kind resid)")
    one.add_argument("--corrupted-prompt", help="run this prompt (same token length) instead of adding noise")
    ds = p.add_argument_group("dataset")
    ds.add_argument("--facts", help="known_1000.json path: trace the facts the model gets right")
    ds.add_argument("--n", type=int, default=None, help="number of known facts to trace (default: all)")
    ds.add_argument("--kinds", default="resid,mlp,attn", help="comma-separated kinds for --facts")
    ds.add_argument("--groups", help="comma-separated token groups to trace (default: all; last_subject suffices for the layer choice)")
    p.add_argument("--window", type=int, default=10, help="layers per mlp/attn window (default: 10)")
    p.add_argument("--samples", type=int, default=10, help="noise samples (default: 10)")
    p.add_argument("--noise", type=float, default=3.0, help="noise std as a multiple of the embedding std (default: 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128, help="restored runs per forward pass")
    p.add_argument("--method", default="exact", choices=METHODS,
                   help="exact: restored runs (default); atp: attribution-patching estimates, one backward pass per prompt; "
                   "atp-logp: the same pass on log p, mapped back to probabilities (estimates on the exact scale)")
    p.add_argument("--noise-reference", help="known_1000.json whose subjects set the embedding std (default: built-in list)")
    p.add_argument("--out", help="single prompt: .html/.png/.json file; dataset: output folder")
    p.add_argument("--save-json", action="store_true", help="with a figure --out, also write the results as .json next to it")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or info logs")
    add_ray_args(p)  # --ray local|auto|ADDRESS, --workers N, --worker-threads T: trace --facts on Ray workers
    return p


def main(argv: list[str] | None = None) -> int:
    """Run `python -m tracer`: trace one prompt (ROME section 2, Figure 1) or a fact set (Figure 2).

    With `--facts` it traces the facts the model gets right, prints each kind's peak average
    indirect effect per token group and, when "mlp" is traced, the chosen edit layer (also
    cached for the editors); otherwise it traces `--prompt` / `--subject`. With `--ray`,
    the facts are traced by `--workers` Ray worker processes (`trace_dataset(workers=)`,
    docs/scaling.md), each loading `--model`; this process writes `traces.jsonl`.

    Args:
        argv: the arguments; None reads `sys.argv`.

    Returns:
        The exit status, 0.

    Raises:
        SystemExit: bad arguments (argparse exits with status 2), e.g. neither `--facts` nor
            both `--prompt` and `--subject`, `--severed` with `--kind all`, `--ray` without
            `--facts`, `--workers` without `--ray`, or `--dtype` other than float32 with `--ray`.
        ValueError: arguments the tracing functions refuse (an unknown subject, a bad
            window, an unsupported `--out` suffix, ...).
        RuntimeError: a static image `--out` without kaleido or a browser.
    """
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.facts is None and (args.prompt is None or args.subject is None):
        _parser().error("give --prompt and --subject, or --facts")
    if args.facts is None and (args.ray is not None or args.workers is not None):
        _parser().error("--ray and --workers trace --facts; a single prompt runs here")
    if args.ray is None and args.workers is not None:
        _parser().error(f"--workers {args.workers} needs --ray local|auto|ADDRESS")
    if args.ray is not None and args.dtype != "float32":
        _parser().error(f"--dtype {args.dtype} with --ray: the workers load the model in float32; trace in one process")
    from tracer.model import cast_model, load_any  # noqa: PLC0415

    model = cast_model(load_any(args.model, loader=args.model_loader, device=args.device), args.dtype)
    common = dict(window=args.window, samples=args.samples, noise=args.noise, seed=args.seed, batch_size=args.batch_size,
                  method=args.method)
    if args.facts is not None:
        from tracer.dataset import trace_dataset  # noqa: PLC0415
        from tracer.layer import choose_edit_layer  # noqa: PLC0415

        kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
        ref = args.noise_reference or args.facts
        groups = tuple(g.strip() for g in args.groups.split(",")) if args.groups else None
        from tracer.workers import pool_from_args  # noqa: PLC0415

        pool = pool_from_args(args)  # None without --ray; Ray is imported only with it
        try:
            res = trace_dataset(model, args.facts, kinds=kinds, n=args.n, out=args.out, groups=groups, noise_reference=ref,
                                progress=not args.quiet, workers=pool, **common)
        finally:
            if pool is not None:
                pool.close()
        print(f"facts checked {res.n_tried}: kept {res.n_facts} the model gets right, dropped {res.n_dropped}")
        if res.n_facts:
            print(f"average high {float(res.high.mean()):.4f}, average low {float(res.low.mean()):.4f}")
            from tracer.dataset import GROUPS  # noqa: PLC0415

            for k in kinds:
                for g in groups or GROUPS:
                    m, c = res.curve(k, g)
                    if bool(m.isnan().all()):
                        continue
                    best = int(m.nan_to_num(nan=-float("inf")).argmax())
                    print(f"{k:5s} {g:16s}: peak AIE {float(m[best]):.4f} ± {float(c[best]):.4f} at layer {best}")
            if "mlp" in kinds:
                ch = choose_edit_layer(model, res)  # an exact choice is also cached for the editors' default_layer
                est = f" [{estimate_label(ch.method)}, not cached]" if is_estimate(ch.method) else ""
                print(f"chosen edit layer{est}: {ch.layer} (MLP AIE at last subject token {ch.curve[ch.layer]:.4f} ± {ch.ci[ch.layer]:.4f}, runner-up layer {ch.runner_up}, margin {ch.margin:.4f}, {ch.n_facts} facts)")
        if args.out:
            res.save(args.out)
            print(f"wrote {Path(args.out) / 'summary.json'}, heatmaps.html, lines.html, traces.jsonl")
        return 0

    from tracer.result import plot_traces, save_figure  # noqa: PLC0415
    from tracer.trace import trace_all, trace_prompt  # noqa: PLC0415

    opts = dict(target=args.target, corrupted_prompt=args.corrupted_prompt, noise_reference=args.noise_reference, **common)
    if args.kind == "all":
        if args.severed:
            _parser().error("--severed needs --kind resid")
        results = list(trace_all(model, args.prompt, args.subject, **opts).values())
    else:
        results = [trace_prompt(model, args.prompt, args.subject, kind=args.kind, severed=args.severed, **opts)]
    r0 = results[0]
    print(f"target {r0.target!r}: high (clean) {r0.high:.4f}, low (corrupted) {r0.low:.4f}")
    for r in results:
        ie = r.indirect_effect()
        t, layer = divmod(int(ie.argmax()), ie.shape[1])
        print(f"{r.kind:5s}: max indirect effect{f' ({estimate_label(r.method)})' if is_estimate(r.method) else ''} {float(ie.max()):+.4f} at token {r.labels()[t]!r} layer {layer}")
    if args.out:
        if args.out.endswith(".json"):
            from tracer.files import atomic_write_text  # noqa: PLC0415

            atomic_write_text(args.out, json.dumps([r.to_dict() for r in results]))
        else:
            save_figure(plot_traces(results) if len(results) > 1 else results[0].plot(), args.out)
            if args.save_json:
                from tracer.files import atomic_write_text  # noqa: PLC0415

                atomic_write_text(Path(args.out).with_suffix(".json"), json.dumps([r.to_dict() for r in results]))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
