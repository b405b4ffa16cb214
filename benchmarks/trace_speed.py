"""Causal-tracing speed: the paper's straightforward method vs `tracer.trace_prompt` (a script, not a test).

The reference below is written out plainly, like `trace_with_patch` in the paper's code:
for every (token, layer, kind) it runs one batch of `samples + 1` copies of the prompt
(row 0 clean, rows 1.. corrupted by the same seeded noise), copies the clean state into the
corrupted rows with hooks, computes full `[batch, pos, vocab]` logits and averages the
softmax probability of the target at the last position. `trace_prompt` must give the same
scores within 1e-4.

Run:
    python -m benchmarks.trace_speed                       # Gemma-3-270m, ~10-token prompt
    python -m benchmarks.trace_speed --facts ../shared/data/known_1000.json   # + projection

Prints wall time per method and kind, speedup, restored runs per second, estimated FLOPs
against the measured matmul throughput of this machine (the FLOP floor), what the model's
own hook-free forward reaches at the trace's shapes (`forward_gflops`: the time the
trace's FLOPs would take at that rate, a ceiling no hook-based trace beats), peak memory,
and a projected time for tracing the whole known_1000 set with all three kinds.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from tracer import load_model, locate_subject
from tracer.model import DTYPES, cast_model
from tracer.hooks import EMBED, hook_name
from tracer.noise import NoiseCache, NoiseScale, resolve_noise
from tracer.trace import _chunks, _conditions, prepare_runs, restore_scores, window_layers  # noqa: F401


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports `ru_maxrss` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@torch.no_grad()
def reference_trace(model, prompt, subject, *, kind, noise_std, samples, seed, window, target_id, cells=None):
    """The paper's method: one forward pass with full logits per (token, layer) (ROME section 2.1).

    Args:
        model: a TransformerLens model with a tokenizer.
        prompt, subject: the fact traced (`locate_subject`).
        kind: "resid", "mlp" or "attn".
        noise_std: standard deviation of the subject-embedding noise, in `hook_embed` units.
        samples: corrupted copies of the prompt per pass.
        seed: seed of the noise.
        window: layers restored around each layer for "mlp" / "attn".
        target_id: the token whose probability is averaged.
        cells: optional list of (token, layer) to compute (others stay NaN); every cell costs
            the same single forward pass, so timing a subset extrapolates linearly.

    Returns:
        `[n_pos, n_layers]` mean probability of `target_id` at the last position over the
        corrupted rows with that cell restored (NaN for cells not computed).

    Raises:
        ValueError: a subject `locate_subject` cannot find, or an empty prompt.
    """
    pt = locate_subject(model, prompt, subject)
    a, b = pt.subject
    n, n_pos = model.cfg.n_layers, len(pt.ids)
    gen = torch.Generator().manual_seed(seed)
    noise = noise_std * torch.randn(samples, b - a, model.cfg.d_model, generator=gen)
    tokens = pt.tensor().repeat(samples + 1, 1)  # row 0 clean, rows 1.. corrupted

    def corrupt(x, hook):
        x = x.clone()
        x[1:, a:b] += noise
        return x

    def restore(t):
        def hook(x, hook):
            x[1:, t] = x[0, t]
            return x

        return hook

    table = torch.full((n_pos, n), float("nan"))
    for t, layer in cells if cells is not None else [(t, l) for t in range(n_pos) for l in range(n)]:
        if True:
            layers = [layer] if kind == "resid" else list(window_layers(layer, window, n))
            hooks = [(EMBED, corrupt)] + [(hook_name(kind, L), restore(t)) for L in layers]
            with model.hooks(fwd_hooks=hooks):
                logits = model(tokens)  # [samples + 1, pos, vocab]: the full unembedding
            table[t, layer] = logits[1:, -1].float().softmax(-1)[:, target_id].mean()
    return table


def layer_flops(cfg, n_tokens: int) -> float:
    """Forward FLOPs of one block over `n_tokens` tokens (matmuls only, 2 per multiply-add).

    Args:
        cfg: the model's TransformerLens config (`d_model`, `n_heads`, `d_head`, `d_mlp`, ...).
        n_tokens: positions in the pass.

    Returns:
        FLOPs (a count, not a rate).
    """
    d, h, dh = cfg.d_model, cfg.n_heads, cfg.d_head
    kv = getattr(cfg, "n_key_value_heads", None) or h
    attn = 2 * d * h * dh * 2 + 2 * d * kv * dh * 2 + 2 * 2 * n_tokens * h * dh
    mlp = 2 * d * cfg.d_mlp * (3 if getattr(cfg, "gated_mlp", False) else 2)
    return n_tokens * (attn + mlp)


def matmul_gflops(size: int = 1024, reps: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """Measured matmul throughput of this machine in `dtype`, in GFLOP/s.

    Args:
        size: side of the square matrices multiplied.
        reps: timed multiplications (after one warm-up).
        dtype: the matrices' dtype.
    """
    x, y = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    x @ y
    t = time.perf_counter()
    for _ in range(reps):
        x @ y
    return 2 * size**3 * reps / (time.perf_counter() - t) / 1e9


@torch.no_grad()
def forward_gflops(model, n_tokens: int, batch: int = 128, reps: int = 3) -> tuple[float, float]:
    """What the model's own forward reaches here, hook-free, in GFLOP/s: `(blocks, unembedding)`.

    The blocks run `batch` rows of `n_tokens` positions through every layer (no cache, no
    hooks: full-length rows are the trace's largest, most efficient matmuls, so this is an
    optimistic ceiling for its batches); the unembedding maps `batch` final residuals to a
    target probability with the trace's own `_target_prob` (final norm, `W_U`, logsumexp over
    the vocabulary), as each restored row of the trace does. FLOPs are counted as
    `layer_flops` and `2 d_model d_vocab` per row.

    Args:
        model: a TransformerLens model (either API), in the dtype to measure.
        n_tokens: positions per row.
        batch: rows per forward pass (the trace's default `batch_size`).
        reps: timed repetitions after one warm-up.
    """
    from tracer.model import final_resid, model_device  # noqa: PLC0415
    from tracer.trace import _target_prob  # noqa: PLC0415

    cfg = model.cfg
    ids = torch.randint(0, cfg.d_vocab, (batch, n_tokens), device=model_device(model))
    final_resid(model, ids)
    t = time.perf_counter()
    for _ in range(reps):
        resid = final_resid(model, ids)
    body = batch * cfg.n_layers * layer_flops(cfg, n_tokens) * reps / (time.perf_counter() - t) / 1e9
    last = resid[:, -1]
    _target_prob(model, last, 0)
    t = time.perf_counter()
    for _ in range(reps):
        _target_prob(model, last, 0)
    unembed = batch * 2 * cfg.d_model * cfg.d_vocab * reps / (time.perf_counter() - t) / 1e9
    return body, unembed


@torch.no_grad()  # restored on return: the tests call main in the same process as everything else
def main(argv=None) -> int:
    """Run `python -m benchmarks.trace_speed`: time the paper's tracing against `trace_prompt`.

    Prints seconds per kind and method, the speedup, estimated FLOPs against measured matmul
    throughput, peak memory and (with `--facts` or `--n-known`) a projected time in hours for
    tracing the known facts; `--json` also writes the numbers.

    Args:
        argv: the arguments; None reads `sys.argv`.

    Returns:
        The exit status: 0 when both methods agree within 1e-4 on every compared cell, else 1.

    Raises:
        SystemExit: bad arguments (argparse exits with status 2), e.g. a non-integer `--samples`.
        ValueError: arguments the tracing functions refuse (an unknown subject or kind, a bad
            window, ...).
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--prompt", default="The Eiffel Tower is located in the city of")
    p.add_argument("--subject", default="Eiffel Tower")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--kinds", default="resid,mlp,attn")
    p.add_argument("--ref-cells", type=int, default=0, help="time the reference on this many evenly spread (token, layer) cells per kind and extrapolate (0: all cells)")
    p.add_argument("--facts", help="known_1000.json: count the facts the model knows and project the full run")
    p.add_argument("--n-known", type=int, default=0, help="without --facts: project the full run for this many known facts")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="trace in this precision (cast after an fp32 load); a reduced one is also timed against fp32")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]

    t0 = time.perf_counter()
    model = load_model(args.model)
    print(f"model {args.model}: {type(model).__name__}, loaded in {time.perf_counter() - t0:.1f} s, torch threads {torch.get_num_threads()}")
    noise_std = resolve_noise(model, 3.0, reference=args.facts, cache=NoiseCache())
    cfg, V = model.cfg, model.cfg.d_vocab
    pt = locate_subject(model, args.prompt, args.subject)
    n, T, S = cfg.n_layers, len(pt.ids), args.samples
    print(f"prompt {args.prompt!r}: {T} tokens, subject {pt.subject}, {n} layers, samples {S}, noise std {noise_std:.4f}")
    rss_model = peak_rss_mib()

    out = {"model": args.model, "tokens": T, "layers": n, "samples": S, "dtype": args.dtype, "kinds": {}}
    fp32 = {}
    def warm_up():  # untimed: first-call allocations and kernel choices, so neither dtype is timed cold
        runs_w = prepare_runs(model, args.prompt, args.subject, samples=S, noise=NoiseScale(value=noise_std), seed=args.seed)
        restore_scores(model, runs_w, kind=kinds[0], window=args.window, batch_size=args.batch_size)

    if args.dtype != "float32":  # the same trace_prompt work in fp32 first: the speedup and |Δscore| it buys
        warm_up()
        t0 = time.perf_counter()
        runs32 = prepare_runs(model, args.prompt, args.subject, samples=S, noise=NoiseScale(value=noise_std), seed=args.seed)
        fp32 = {kind: restore_scores(model, runs32, kind=kind, window=args.window, batch_size=args.batch_size) for kind in kinds}
        out["fp32_fast_s"] = time.perf_counter() - t0
        fp32_rates = forward_gflops(model, T, batch=args.batch_size)
        cast_model(model, args.dtype)
        warm_up()
    t0 = time.perf_counter()
    runs = prepare_runs(model, args.prompt, args.subject, samples=S, noise=NoiseScale(value=noise_std), seed=args.seed)
    t_prep = time.perf_counter() - t0
    fast = {}
    for kind in kinds:
        t0 = time.perf_counter()
        fast[kind] = restore_scores(model, runs, kind=kind, window=args.window, batch_size=args.batch_size)
        out["kinds"][kind] = {"fast_s": time.perf_counter() - t0}
    t_fast = t_prep + sum(v["fast_s"] for v in out["kinds"].values())
    rss_fast = peak_rss_mib()
    all_cells = [(t, l) for t in range(T) for l in range(n)]
    cells = None
    if args.ref_cells and args.ref_cells < len(all_cells):
        step = len(all_cells) / args.ref_cells
        cells = [all_cells[int(i * step)] for i in range(args.ref_cells)]
        print(f"reference timed on {len(cells)} of {len(all_cells)} cells per kind (one forward pass each), extrapolated x{len(all_cells) / len(cells):.1f}")
    for kind in kinds:
        t0 = time.perf_counter()
        ref = reference_trace(model, args.prompt, args.subject, kind=kind, noise_std=noise_std, samples=S, seed=args.seed, window=args.window, target_id=runs.target_id, cells=cells)
        k = out["kinds"][kind]
        k["reference_measured_s"] = time.perf_counter() - t0
        k["reference_s"] = k["reference_measured_s"] * (len(all_cells) / len(cells) if cells else 1)
        done = ~torch.isnan(ref)
        k["cells_compared"] = int(done.sum())
        k["max_abs_diff"] = float((ref[done] - fast[kind][done]).abs().max())
    rss_ref = peak_rss_mib()

    # FLOPs: reference = (S+1) rows x T tokens x n layers + full unembed of T positions, per cell;
    # fast = per condition S rows from its start layer + one unembedded position, plus the prep runs
    unembed = 2 * cfg.d_model * V
    body_all = n * layer_flops(cfg, T)
    ref_flops = fast_flops = 0.0
    fast_flops += (1 + S) * (body_all + unembed)  # clean + corrupted runs over all T tokens, last-position unembed
    fast_unembed = (1 + S) * unembed  # the unembedding's share of fast_flops, counted apart for the ceiling
    for kind in kinds:
        ref_flops += T * n * (S + 1) * (body_all + T * unembed)
        for cond in _conditions(kind, T, n, runs.first_changed, args.window):
            tok = cond.tok.repeat_interleave(S)
            fast_flops += len(tok) * unembed
            fast_unembed += len(tok) * unembed
            # with the key/value cache (TransformerLens 3.x) a batch computes positions min(tok).. only
            for idx in _chunks(tok, args.batch_size, n_pos=T if runs.corrupt_kv is not None else None):
                p0 = int(tok[idx].min()) if runs.corrupt_kv is not None else 0
                fast_flops += len(idx) * (n - cond.start) * layer_flops(cfg, T - p0)
    gflops = matmul_gflops(dtype=DTYPES[args.dtype])
    t_ref = sum(v["reference_s"] for v in out["kinds"].values())
    print(f"\n{'kind':6s} {'reference s':>12s} {'trace_prompt s':>15s} {'speedup':>8s} {'max |diff|':>11s}")
    for kind in kinds:
        k = out["kinds"][kind]
        print(f"{kind:6s} {k['reference_s']:12.2f} {k['fast_s']:15.2f} {k['reference_s'] / k['fast_s']:7.1f}x {k['max_abs_diff']:11.2e}  ({k['cells_compared']} cells compared, reference measured {k['reference_measured_s']:.2f} s)")
    print(f"{'total':6s} {t_ref:12.2f} {t_fast:15.2f} {t_ref / t_fast:7.1f}x   (fast total includes {t_prep:.2f} s clean+corrupted runs)")
    tol = 1e-4 if args.dtype == "float32" else 0.02  # a reduced dtype rounds differently in other batch shapes
    ok = all(out["kinds"][k]["max_abs_diff"] <= tol for k in kinds)
    print(f"scores agree within {tol:g}: {ok}")
    if fp32 and runs32.target_id != runs.target_id:
        print(f"{args.dtype} scores another target than fp32 (token {runs.target_id} vs {runs32.target_id}): no |Δscore|")
    elif fp32:
        d32 = max(float((fp32[k] - fast[k].float()).abs().max()) for k in kinds)
        same = all(int(fp32[k].argmax()) == int(fast[k].float().argmax()) for k in kinds)
        print(f"{args.dtype} against fp32 (trace_prompt both): {out['fp32_fast_s'] / t_fast:.2f}x faster ({out['fp32_fast_s']:.2f} s -> {t_fast:.2f} s), "
              f"max |Δscore| {d32:.4f}, argmax cell the same in every kind: {same}")
        out.update(speedup_over_fp32=out["fp32_fast_s"] / t_fast, max_abs_diff_fp32=d32, argmax_same=same)
    runs_n = len(kinds) * T * n * S
    print(f"restored runs (token x layer x sample): {runs_n}; per second: reference {runs_n / t_ref:.0f}, trace_prompt {runs_n / t_fast:.0f}")
    print(f"estimated FLOPs: reference {ref_flops / 1e12:.2f} TFLOP, trace_prompt {fast_flops / 1e12:.3f} TFLOP ({ref_flops / fast_flops:.1f}x fewer)")
    print(f"matmul throughput here (1024^3 {args.dtype}): {gflops:.1f} GFLOP/s -> achieved: reference {ref_flops / t_ref / 1e9:.1f} GFLOP/s, trace_prompt {fast_flops / t_fast / 1e9:.1f} GFLOP/s")
    body_rate, unembed_rate = forward_gflops(model, T, batch=args.batch_size)
    floor_s = fast_flops / gflops / 1e9
    def at_rates(blocks, unembedding):  # seconds for trace_prompt's FLOPs at the forward's own rates
        return ((fast_flops - fast_unembed) / blocks + fast_unembed / unembedding) / 1e9

    ceiling_s = at_rates(body_rate, unembed_rate)
    print(f"FLOP floor at the matmul probe: {floor_s:.2f} s; trace_prompt at {t_fast / floor_s:.2f}x the floor")
    print(f"the model's own hook-free forward here ({args.batch_size} rows of {T} tokens): blocks {body_rate:.1f} GFLOP/s, "
          f"unembedding to p(target) {unembed_rate:.1f} GFLOP/s -> trace_prompt's FLOPs at those rates {ceiling_s:.2f} s "
          f"({ceiling_s / floor_s:.2f}x the floor); trace_prompt at {t_fast / ceiling_s:.2f}x that")
    out.update(floor_s=floor_s, forward_gflops={"blocks": body_rate, "unembed": unembed_rate}, forward_ceiling_s=ceiling_s,
               fast_unembed_tflop=fast_unembed / 1e12)
    if fp32:  # how much faster the reduced dtype makes the model's own forward: a bound on what the trace can gain
        ceiling32 = at_rates(*fp32_rates)
        print(f"the same hook-free forward in float32: blocks {fp32_rates[0]:.1f}, unembedding {fp32_rates[1]:.1f} GFLOP/s -> "
              f"{ceiling32:.2f} s; {args.dtype} makes the model's own forward {ceiling32 / ceiling_s:.2f}x faster")
        out.update(forward_gflops_fp32={"blocks": fp32_rates[0], "unembed": fp32_rates[1]}, forward_speedup_over_fp32=ceiling32 / ceiling_s)
    print(f"peak RSS: after model load {rss_model:.0f} MiB, after trace_prompt {rss_fast:.0f} MiB, after reference {rss_ref:.0f} MiB")
    out.update(reference_s=t_ref, fast_s=t_fast, prep_s=t_prep, speedup=t_ref / t_fast, agree=ok, ref_tflop=ref_flops / 1e12, fast_tflop=fast_flops / 1e12, matmul_gflops=gflops, rss_mib=[rss_model, rss_fast, rss_ref])
    if args.facts:
        from tracer.dataset import known_mask, load_facts  # noqa: PLC0415

        facts = load_facts(args.facts)
        t0 = time.perf_counter()
        mask = known_mask(model, facts)
        t_mask = time.perf_counter() - t0
        known = [f for f, k in zip(facts, mask) if k]
        lengths = [len(locate_subject(model, f.prompt, f.subject).ids) for f in known]
        mean_len = sum(lengths) / max(len(lengths), 1)
        # cost grows ~ tokens^2 (conditions x sequence length): scale the measured per-prompt time
        per_fact = t_fast * (mean_len / T) ** 2
        print(f"\nknown facts: the model gets {len(known)} of {len(facts)} right (checked in {t_mask:.1f} s); mean prompt length {mean_len:.1f} tokens")
        print(f"projected full run (3 kinds, {S} samples): trace_prompt {per_fact * len(known) / 3600:.2f} h, reference {per_fact * len(known) * t_ref / t_fast / 3600:.1f} h")
        out.update(n_facts=len(facts), n_known=len(known), mean_len=mean_len, projected_h=per_fact * len(known) / 3600)
    elif args.n_known:
        print(f"\nprojected full run for {args.n_known} known facts (3 kinds, {S} samples, prompts of ~{T} tokens): "
              f"trace_prompt {t_fast * args.n_known / 3600:.2f} h, reference {t_ref * args.n_known / 3600:.1f} h")
        out.update(n_known=args.n_known, projected_h=t_fast * args.n_known / 3600)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
