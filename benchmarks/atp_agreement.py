"""How well attribution patching screens for the exact causal trace (a script, not a test).

Traces the same known facts twice, exactly (`trace_dataset`) and with attribution-patching
estimates (`--method atp`, or `atp-logp`, the log-space estimate), each into its own resumable folder, and compares them per fact
and kind (resid, mlp, attn) over the cells from the first subject token on (earlier tokens
are `low` in both, exactly, and would inflate the agreement):

- Spearman rank correlation of the `[pos, layer]` scores (`scipy.stats.spearmanr`);
- top-cell match: both put the largest indirect effect in the same (token, layer) cell;
- the edit layer `choose_edit_layer` picks from each (MLP at the last subject token);
- the speedup: wall time of the exact and the AtP traces (all three kinds) of the first
  `--time-n` facts, traced again in this process so that the timing is not a resumed run's.

Run:
    python -m benchmarks.atp_agreement --facts ../shared/data/known_1000.json --n 50 --out results/atp-agreement
    python -m benchmarks.atp_agreement --n 50 --exact docs/results/fig2-known1000 --out results/atp-agreement
    python -m benchmarks.atp_agreement --n 490 --method atp-logp --exact docs/results/fig2-known1000 --out results/atp-logp

Writes `<out>/agreement.json` (per fact and the summary) and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Sequence

import torch

from tracer.hooks import KINDS


def compare_fact(exact: dict, atp: dict, kinds: Sequence[str] = KINDS) -> dict:
    """Agreement of one fact's exact and AtP trace records (`traces.jsonl` lines).

    Returns:
        `{kind: {"spearman", "top_cell_match", "exact_top", "atp_top"}}` over the cells from
        the first subject token on; `spearman` is NaN where either trace is constant there.
    """
    from scipy.stats import spearmanr  # noqa: PLC0415

    first = exact["subject_span"][0]
    out = {}
    for k in kinds:
        e = torch.tensor(exact["scores"][k], dtype=torch.float64)[first:]
        a = torch.tensor(atp["scores"][k], dtype=torch.float64)[first:]
        rho = spearmanr(e.flatten().numpy(), a.flatten().numpy()).statistic
        n_layers = e.shape[1]
        et, at = divmod(int(e.argmax()), n_layers), divmod(int(a.argmax()), n_layers)
        out[k] = {"spearman": float(rho), "top_cell_match": et == at,
                  "exact_top": [et[0] + first, et[1]], "atp_top": [at[0] + first, at[1]]}
    return out


def summarize(per_fact: dict, kinds: Sequence[str] = KINDS) -> dict:
    """Mean (and median) Spearman and the top-cell match rate per kind over facts."""
    out = {}
    for k in kinds:
        rhos = sorted(f[k]["spearman"] for f in per_fact.values() if not math.isnan(f[k]["spearman"]))
        out[k] = {
            "facts": len(per_fact),
            "spearman_mean": sum(rhos) / len(rhos) if rhos else float("nan"),
            "spearman_median": rhos[len(rhos) // 2] if rhos else float("nan"),
            "top_cell_match_rate": sum(f[k]["top_cell_match"] for f in per_fact.values()) / max(len(per_fact), 1),
        }
    return out


def main(argv=None) -> dict:
    """Run `python -m benchmarks.atp_agreement`; see the module docstring.

    Returns:
        The summary dict (also in `<out>/agreement.json`): per kind the Spearman mean and
        median and the top-cell match rate, the two layer choices, and the timing.

    Raises:
        SystemExit: bad arguments (argparse exits with status 2).
        ValueError: what `trace_dataset` refuses (e.g. an `--out` folder of other settings).
    """
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--facts", default=str(Path(os.environ.get("ROMELENS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "known_1000.json"))
    ap.add_argument("--n", type=int, default=50, help="known facts (those the model gets right)")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--time-n", type=int, default=3, help="facts traced again by both methods for the timing (0: none)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--exact", default=None, metavar="DIR",
                    help="reuse this exact trace_dataset folder (e.g. the whole known_1000 run) instead of tracing "
                    "exactly into <out>/exact; its samples, window, seed and noise std are used for AtP too, and it "
                    "must hold --n known facts (it is only read)")
    ap.add_argument("--method", default="atp", choices=("atp", "atp-logp"), help="the estimate compared with the exact trace")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from tracer import load_model  # noqa: PLC0415
    from tracer.dataset import load_facts, read_run, run_options, trace_dataset  # noqa: PLC0415
    from tracer.layer import choose_from_result  # noqa: PLC0415
    from tracer.noise import NoiseScale  # noqa: PLC0415
    from tracer.trace import trace_all  # noqa: PLC0415

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    common = dict(n=args.n, samples=args.samples, window=args.window)
    folders = {"exact": Path(args.exact) if args.exact else out / "exact", "atp": out / args.method}
    if args.exact:  # the folder's own settings and noise std (else trace_dataset refuses it), and never traced into
        try:
            cfg, lines = read_run(folders["exact"])
        except ValueError as err:
            raise SystemExit(f"--exact {args.exact}: {err}") from err
        if cfg.get("method", "exact") != "exact":
            raise SystemExit(f"--exact {args.exact} is a {cfg['method']} run, not an exact one")
        common.update(run_options(cfg))
        del common["method"]  # each trace below names its own
        args.samples, args.window = cfg["samples"], cfg["window"]
        kept = sum(1 for r in lines.values() if r["correct"])
        if kept < args.n:
            raise SystemExit(f"--exact {args.exact} holds {kept} known facts, fewer than --n {args.n}")
    model = load_model(args.model)
    results = {}
    methods = {"exact": "exact", "atp": args.method}  # role -> the method traced in that role
    for role, method in methods.items():
        results[role] = trace_dataset(model, args.facts, out=folders[role], method=method, **common)
    exact, atp = (read_run(folders[m])[1] for m in ("exact", "atp"))
    ids = [str(i) for i in results["exact"].known_ids]
    per_fact = {i: compare_fact(exact[i], atp[i], common.get("kinds", KINDS)) for i in ids}
    choice = {m: choose_from_result(r) for m, r in results.items()}
    summary = {
        "model": args.model, "facts": len(ids), "samples": args.samples, "window": args.window, "estimate": args.method,
        "kinds": summarize(per_fact, common.get("kinds", KINDS)),
        "layer_choice": {m: {"layer": c.layer, "runner_up": c.runner_up, "curve": list(c.curve)} for m, c in choice.items()},
        "same_layer": choice["exact"].layer == choice["atp"].layer,
    }
    if args.time_n:
        facts = {str(f.known_id): f for f in load_facts(args.facts)}
        timing = {}
        noise = NoiseScale(value=results["exact"].noise_std)
        for role, method in methods.items():
            t = time.perf_counter()
            for i in ids[: args.time_n]:
                f = facts[i]
                trace_all(model, f.prompt.replace("{}", f.subject), f.subject, samples=args.samples, window=args.window,
                          noise=noise, method=method)
            timing[role] = (time.perf_counter() - t) / min(args.time_n, len(ids))
        summary["seconds_per_fact"] = timing
        summary["speedup"] = timing["exact"] / timing["atp"]
        summary["torch_threads"] = torch.get_num_threads()
        summary["load_average"] = os.getloadavg()
    out.mkdir(parents=True, exist_ok=True)
    (out / "agreement.json").write_text(json.dumps({"summary": summary, "per_fact": per_fact}, indent=1))
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
