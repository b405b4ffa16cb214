"""romelens benchmarks: CounterFact and zsRE evaluation of model edits, with a resumable runner.

Run from the command line (one JSON line per record, then summary.json / summary.md):

    python -m benchmarks.counterfact --model gemma-3-270m --method rome --n 100 --out results/rome
    python -m benchmarks.zsre --model gemma-3-270m --method none --n 100 --out results/zsre-none
    python -m benchmarks.compare results/none results/rome

See docs/benchmarks.md for what each metric means.
"""
