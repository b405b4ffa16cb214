"""Command line: edit one fact and show predictions before and after.

Example:
    python -m editor --model gemma-3-270m --prompt "{} is located in the city of" \\
        --subject "Eiffel Tower" --new Rome --save eiffel.safetensors
    python -m editor --model runs/my-llama --layer 5 --new Rome     # a local Hugging Face folder

A model without a preset gets its edit layer from `editor.hparams.default_layer` (a cached
causal-tracing choice, or a new one, announced with its cost); `--layer` skips that.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace

import torch

from tracer.model import add_model_args


def _top(model, prompt: str, k: int = 3) -> list[tuple[str, float]]:
    from tracer.model import final_logits, final_resid, model_device  # noqa: PLC0415
    from tracer.prompts import encode  # noqa: PLC0415

    ids = torch.tensor([encode(model, prompt)], device=model_device(model))
    with torch.no_grad():
        probs = final_logits(model, final_resid(model, ids)[:, -1]).float().softmax(-1)[0]
    top = probs.topk(k)
    return [(model.tokenizer.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]


def _fmt(preds) -> str:
    return "  ".join(f"{t!r} {p:.3f}" for t, p in preds)


def main(argv: list[str] | None = None) -> int:
    """Run `python -m editor`: edit one fact, print the top-3 next tokens before and after.

    The prompt, a paraphrase and an unrelated neighbour prompt are shown (probabilities);
    the edit is saved with `--save`, then restored, so the loaded model ends unedited.

    Args:
        argv: the arguments; None reads `sys.argv`.

    Returns:
        The exit status, 0.

    Raises:
        SystemExit: bad arguments (argparse exits with status 2).
        EditRequestError: (a `ValueError`) `--prompt` without exactly one `{}`, an empty
            subject or target, or `--true` equal to `--new`.
        ValueError: what the chosen method's `edit` refuses (`editor.checks.check_edit`:
            a layer out of range, too few `--stats-tokens`, ...).
    """
    ap = argparse.ArgumentParser(prog="python -m editor", description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--prompt", default="{} is located in the city of", help="template with {} for the subject")
    ap.add_argument("--subject", default="The Eiffel Tower")
    ap.add_argument("--new", required=True, help="new target, e.g. Rome")
    ap.add_argument("--true", default=None, help="current target (for diagnostics)")
    ap.add_argument("--paraphrase", default=None,
                    help="a paraphrase prompt with {} (default: 'Here is a fact about a famous place. ' + prompt)")
    ap.add_argument("--neighbor", default="The Louvre is located in the city of",
                    help="an unrelated prompt that should not change")
    ap.add_argument("--method", choices=("rome", "memit", "ft-l"), default="rome")
    ap.add_argument("--layer", type=int, default=None,
                    help="edit this layer (ROME/FT-L; MEMIT: the last of its range) instead of the preset's; "
                    "for a model without a preset this skips choosing the layer by causal tracing")
    ap.add_argument("--stats-tokens", type=int, default=None, help="tokens for the key covariance")
    ap.add_argument("--data-dir", default=None, help="shared data folder (default ../shared/data or $ROMELENS_DATA)")
    ap.add_argument("--corpus", default=None, help="text file for the statistics (default <data-dir>/wikitext-2-raw-test.txt)")
    ap.add_argument("--cache-dir", default=None, help="romelens cache root")
    ap.add_argument("--save", default=None, help="write the edit to this .safetensors file")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from editor import METHODS, EditRequest  # noqa: PLC0415
    from tracer.model import load_any  # noqa: PLC0415

    if args.data_dir:
        os.environ["ROMELENS_DATA"] = args.data_dir
    corpus = args.corpus or (os.path.join(args.data_dir, "wikitext-2-raw-test.txt") if args.data_dir else None)
    req = EditRequest(prompt=args.prompt, subject=args.subject, target_new=args.new, target_true=args.true)
    # default paraphrase: the prompt after an unrelated sentence, as CounterFact paraphrases are
    paraphrase = args.paraphrase or "Here is a fact about a famous place. " + args.prompt
    prompts = {"prompt": req.filled, "paraphrase": paraphrase.replace("{}", args.subject), "neighbor": args.neighbor}

    model = load_any(args.model, loader=args.model_loader, device=args.device)
    method = METHODS[args.method]
    # an explicit layer builds the hparams directly: no causal tracing for a model without a preset
    hp = method.hparams_for(model) if args.layer is None else method.hparams_for(model, layer=args.layer)
    if args.stats_tokens is not None and hasattr(hp, "mom2_n_tokens"):
        hp = replace(hp, mom2_n_tokens=args.stats_tokens)
    before = {k: _top(model, p) for k, p in prompts.items()}
    kw = {} if args.method == "ft-l" else {"corpus": corpus, "cache_dir": args.cache_dir}
    result = method.edit(model, req, hp, **kw)
    after = {k: _top(model, p) for k, p in prompts.items()}
    print(f"{args.method} edit of {args.model}: {req.filled!r} -> {args.new!r} (layers {list(result.layers)})")
    for k, p in prompts.items():
        print(f"\n[{k}] {p}")
        print(f"  before: {_fmt(before[k])}")
        print(f"  after:  {_fmt(after[k])}")
    if args.save:
        path = result.save(args.save)
        print(f"\nsaved edit to {path}")
    result.restore()
    return 0


if __name__ == "__main__":
    sys.exit(main())
