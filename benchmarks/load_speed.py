"""Time loading the offline default model: cold (GGUF conversion) and cached.

    python -m benchmarks.load_speed [--model gemma-3-270m] [--skip-cold]

Each load runs in a fresh Python process, so import time is counted and nothing is
shared between runs. The cold load uses an empty temporary cache folder; the cached load
then reuses that folder. Prints wall-clock seconds and the peak resident memory of each.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from tracer import load_model
from tracer.model import TL_API
model = load_model(sys.argv[1], cache_dir=sys.argv[2])
took = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": took, "peak_mib": peak, "api": TL_API, "class": type(model).__name__}))
"""


def _load_once(model: str, cache: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, model, cache], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Run `python -m benchmarks.load_speed`: time a cold and a cached load, each in a fresh process.

    Reads `sys.argv` (`--model`, `--cache`, `--skip-cold`) and prints wall-clock seconds and
    peak resident memory (MiB) of each load.

    Raises:
        SystemExit: bad arguments (argparse exits with status 2).
        subprocess.CalledProcessError: a load failed in its child process (its stderr is on
            the exception).
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--cache", default=None, help="cache folder for the cached run (default: a fresh temp folder)")
    parser.add_argument("--skip-cold", action="store_true", help="only time a load from an existing --cache")
    args = parser.parse_args()
    cache = args.cache or tempfile.mkdtemp(prefix="romelens-load-")
    if not args.skip_cold:
        cold = _load_once(args.model, cache)
        print(f"cold load (GGUF conversion + TransformerLens): {cold['seconds']:.1f} s, "
              f"peak {cold['peak_mib']:.0f} MiB, {cold['class']} (TL {cold['api']}.x)")
    warm = _load_once(args.model, cache)
    print(f"cached load: {warm['seconds']:.1f} s, peak {warm['peak_mib']:.0f} MiB, {warm['class']} (TL {warm['api']}.x)")


if __name__ == "__main__":
    main()
