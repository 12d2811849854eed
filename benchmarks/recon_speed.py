"""Seconds of ``recon``'s reconstruction per step, on ResNet-20 (W4A4) and EfficientNet-Lite0 (W4A8, 224 px).

Times the library's ``reconstruct`` (deploy protocol, QDrop on, the defaults' batch per model: 32 for the CIFAR
model, 16 for Lite0 as its CPU rows run it) on a fixed standard-normal pool; the accuracy does not matter here, only
the time of the steps. Each model runs ``--iters`` and ``2 * --iters`` steps per unit, ``--repeats`` times
alternately after one untimed run, so the difference of the medians is the time of ``--iters`` steps on every unit
without the pool passes that do not depend on the steps. Run it at two commits to compare them (``--label``): the
rows of other labels are kept. The allocator is set up as the CLI sets it (``dfq.utils.allocator``, where that
module exists) unless ``--glibc-defaults``; each row says which, with the process's peak resident set so far.

Usage: python benchmarks/recon_speed.py --label NAME [--models resnet20a_cifar10 efficientnet_lite0] [--iters 20]
       [--repeats 3] [--glibc-defaults]
Writes benchmarks/results/recon_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch
from _common import LITE0, RESULTS, WEIGHTS, provenance, write_result

import dfq
from dfq.api import from_preprocessing
from dfq.methods.recon import ReconConfig, reconstruct
from dfq.models import create_model

MODELS = {  # weights, bits, pool size, batch
    "resnet20a_cifar10": (WEIGHTS, (4, 4), 256, 32),
    "efficientnet_lite0": (LITE0, (4, 8), 64, 16),
}


def _time(p: torch.nn.Module, quant: dfq.QuantConfig, pool: torch.Tensor, iters: int, batch: int) -> float:
    config = ReconConfig(num_samples=len(pool), iters=iters, batch_size=batch)
    start = time.perf_counter()
    reconstruct(p, quant, config, pool, generator=torch.Generator().manual_seed(0), progress=False)
    return time.perf_counter() - start


def measure(model: str, iters: int, repeats: int) -> dict:
    weights, (wbits, abits), size, batch = MODELS[model]
    if not weights.is_file():
        sys.exit(f"recon_speed: {weights} is missing (see ../shared/data/README)")
    p = create_model(model, weights=weights).eval()
    pool = torch.randn((size, *p.dfq_info.input_size), generator=torch.Generator().manual_seed(0))
    quant = from_preprocessing(p, dfq.QuantConfig(wbits=wbits, abits=abits, weight_scales="stored"))[0]
    _time(p, quant, pool, 1, batch)  # the first run pays one-off costs (lazy initialisation, page faults)
    short, long = [], []
    for i in range(repeats):  # alternately first, so that neither length gets the machine's slow moments
        runs = [(short, iters), (long, 2 * iters)]
        for times, n in runs if i % 2 == 0 else runs[::-1]:
            times.append(_time(p, quant, pool, n, batch))
    steps = (statistics.median(long) - statistics.median(short)) / iters
    return {"model": model, "bits": f"W{wbits}A{abits}", "batch": batch, "iters": [iters, 2 * iters],
            "seconds_short": [round(t, 2) for t in short], "seconds_long": [round(t, 2) for t in long],
            "seconds_per_step_all_units": round(steps, 4)}  # fmt: skip


def _tune_allocator() -> str:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return "MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ from the environment"
    try:
        from dfq.utils.allocator import reuse_freed_memory
    except ImportError:  # a commit before the module
        return "glibc defaults"
    return "dfq.utils.allocator.reuse_freed_memory" if reuse_freed_memory() else "glibc defaults (not applied)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="name of this code version in the results")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--glibc-defaults", action="store_true", help="leave glibc's allocator as it is")
    args = parser.parse_args()
    torch.manual_seed(0)
    allocator = "glibc defaults" if args.glibc_defaults else _tune_allocator()
    old = RESULTS / "recon_speed.json"
    rows = json.loads(old.read_text())["rows"] if old.is_file() else []
    origin = provenance()  # once: it runs git
    for model in args.models:
        row = {"label": args.label, "allocator": allocator, **measure(model, args.iters, args.repeats),
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
               "command": origin["command"], "git_commit": origin["git_commit"]}  # fmt: skip
        rows = [r for r in rows if (r["label"], r["model"]) != (args.label, model)] + [row]
        print(row, flush=True)
        write_result("recon_speed", {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
