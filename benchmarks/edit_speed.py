"""Editing speed on this machine: key statistics, one ROME edit, a MEMIT batch, peak memory.

Run:
    python -m benchmarks.edit_speed --model gemma-3-270m --data-dir ../shared/data --out edit_speed.json

Measures, each optional:
1. `C = E[k kᵀ]` for one layer over WikiText-2 test (or `--stats-tokens` of it) with the
   forward pass stopped after the layer, in tokens/s;
2. the same work as full forward passes (no early stop), for comparison;
3. one ROME edit with the statistics cached;
4. one MEMIT batch of `--memit-n` CounterFact requests (statistics cached, `--memit-hparam`
   overrides), in seconds per edit, with how many value-optimisation steps the requests
   used and how many reached the early-stop threshold (the target optimisation dominates);
5. peak resident memory of the process.
Writes one JSON object (the measurements) to `--out` and prints it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def main(argv=None) -> dict:
    """Run `python -m benchmarks.edit_speed`: time key statistics, one ROME edit and a MEMIT batch.

    Loads `--model`, measures what the module docstring lists (each part skipped by its
    option), writes the measurements as one JSON object to `--out` and prints them. The model
    is restored after each edit.

    Args:
        argv: the arguments; None reads `sys.argv`.

    Returns:
        The measurements: `load_s` and `*_s` / `seconds` in seconds, `tokens_per_s` in tokens
        per second, the ROME edit's NLL curve (nats) and first-token probabilities before and
        after, MEMIT efficacy (a fraction), `peak_rss_gib` in GiB.

    Raises:
        SystemExit: bad arguments (argparse exits with status 2), e.g. a non-integer
            `--stats-tokens`.
        ValueError: a model, corpus or record the library refuses (e.g. a `--data-dir`
            without `wikitext-2-raw-test.txt`, too few statistics tokens).
        FileNotFoundError: with `--memit-n`, no `counterfact_dev.json` in `--data-dir`.
    """
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--data-dir", default=os.environ.get("ROMELENS_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")))
    ap.add_argument("--stats-tokens", type=int, default=10**9, help="cap on tokens for the timed statistics pass (default: the whole corpus; 0: skip it)")
    ap.add_argument("--full-tokens", type=int, default=20_000, help="tokens for the no-early-stop comparison (0: skip)")
    ap.add_argument("--memit-n", type=int, default=100, help="MEMIT batch size (0: skip)")
    ap.add_argument("--memit-start", type=int, default=0, help="first CounterFact dev record of the MEMIT batch")
    ap.add_argument("--memit-hparam", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field of the MEMIT preset (repeatable), e.g. z_batch_size=32 or spread=joint")
    ap.add_argument("--skip-rome", action="store_true")
    ap.add_argument("--cache-dir", default=None, help="cache root (default: a fresh temporary folder)")
    ap.add_argument("--out", default="edit_speed.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch  # noqa: PLC0415

    from editor import METHODS, EditRequest, rome  # noqa: PLC0415
    from editor.stats import compute_stats, layer_stats  # noqa: PLC0415
    from tracer import load_model, weights_hash  # noqa: PLC0415

    res: dict = {"model": args.model, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    cache = Path(args.cache_dir or tempfile.mkdtemp(prefix="romelens-bench-"))
    corpus = str(Path(args.data_dir) / "wikitext-2-raw-test.txt")

    t = time.perf_counter()
    model = load_model(args.model)
    res["load_s"] = time.perf_counter() - t
    whash = weights_hash(model)
    hp = METHODS["rome"].hparams_for(model)
    layer = hp.layer

    if args.stats_tokens:
        t = time.perf_counter()
        _, n = compute_stats(model, [layer], corpus=corpus, n_tokens=args.stats_tokens)
        dt = time.perf_counter() - t
        res["stats_early_stop"] = {"layer": layer, "tokens": n, "seconds": dt, "tokens_per_s": n / dt}

    if args.full_tokens:
        t = time.perf_counter()
        _, n2 = compute_stats(model, [layer], corpus=corpus, n_tokens=args.full_tokens, early_stop=False)
        dt = time.perf_counter() - t
        res["stats_full_forward"] = {"tokens": n2, "seconds": dt, "tokens_per_s": n2 / dt}
        t = time.perf_counter()
        _, n3 = compute_stats(model, [layer], corpus=corpus, n_tokens=args.full_tokens, early_stop=True)
        dt = time.perf_counter() - t
        res["stats_early_stop_same_tokens"] = {"tokens": n3, "seconds": dt, "tokens_per_s": n3 / dt}

    stats_tokens = min(hp.mom2_n_tokens, res["stats_early_stop"]["tokens"]) if args.stats_tokens else hp.mom2_n_tokens
    hp = replace(hp, mom2_n_tokens=stats_tokens)
    if not args.skip_rome:
        layer_stats(model, layer, corpus=corpus, n_tokens=stats_tokens, cache_dir=cache, model_hash=whash)  # cache it
        req = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome", target_true="Paris")
        from tracer import target_probs  # noqa: PLC0415

        prompts = {"prompt": req.filled,
                   "paraphrase": "Here is a fact about a famous place. " + req.filled,
                   "neighbor": "The Louvre is located in the city of"}

        def probs():
            tp = target_probs(model, list(prompts.values()) * 2, ["Rome"] * 3 + ["Paris"] * 3).first
            return {k: {"Rome": float(tp[i]), "Paris": float(tp[i + 3])} for i, k in enumerate(prompts)}

        before = probs()
        context_templates_warm = time.perf_counter()
        from editor.rome import templates_for  # noqa: PLC0415

        templates_for(model, hp.context_lengths, cache_dir=cache, model_hash=whash)  # generate + cache
        res["context_templates_s"] = time.perf_counter() - context_templates_warm
        t = time.perf_counter()
        e = rome.edit(model, req, hp, corpus=corpus, cache_dir=cache)
        res["rome_edit_s"] = time.perf_counter() - t
        res["rome_edit"] = {"layer": hp.layer, "stats_tokens": stats_tokens,
                            "nll_curve": e.diagnostics["steps"][0]["nll_curve"],
                            "before": before, "after": probs()}
        e.restore()

    if args.memit_n:
        recs = json.loads((Path(args.data_dir) / "counterfact_dev.json").read_text())
        recs = recs[args.memit_start : args.memit_start + args.memit_n]
        reqs = [EditRequest.from_counterfact(r) for r in recs]
        from benchmarks.runner import parse_overrides  # noqa: PLC0415

        mhp = replace(METHODS["memit"].hparams_for(model), mom2_n_tokens=stats_tokens, **parse_overrides(args.memit_hparam))
        layer_stats(model, list(mhp.layers), corpus=corpus, n_tokens=stats_tokens, cache_dir=cache, model_hash=whash)
        t = time.perf_counter()
        e = METHODS["memit"].edit_many(model, reqs, mhp, corpus=corpus, cache_dir=cache)
        dt = time.perf_counter() - t
        after = e.diagnostics["after"]
        curves = e.diagnostics.get("nll_curves") or []
        res["memit_batch"] = {
            "n": len(reqs), "start": args.memit_start, "hparams": repr(mhp), "seconds": dt, "seconds_per_edit": dt / len(reqs),
            "efficacy": float((after["new_seq"] > after.get("true_seq", 0)).float().mean()),
            # steps each request ran before it was frozen (a batch's curve repeats a converged request's NLL)
            "steps_mean": sum(next((i + 1 for i, v in enumerate(c) if v < mhp.early_stop_nll), len(c))
                              for c in curves) / max(len(curves), 1),
            "converged": sum(any(v < mhp.early_stop_nll for v in c) for c in curves), "requests": len(curves),
        }
        e.restore()

    res["load_average"] = os.getloadavg()
    res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
