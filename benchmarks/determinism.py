"""Is a CPU run with one seed bit-identical from process to process? Per setting of MKL's code-path switch.

Each probe is a fresh process with 2 threads that quantizes the zoo's ``resnet20a_cifar10`` (random weights, seeded)
with a short ``recon`` and a short ``adadfq`` run, and prints a hash of each Q's state dict. The same probe is run
``--runs`` times per value of ``MKL_CBWR``: AUTO is close to MKL's default, COMPATIBLE pins the most portable path.
A setting is reproducible when every run of it prints one hash. The iteration speed of AdaDFQ (``dfq bench``,
batch 16) is measured under each setting in alternation, for the cost of pinning the code path.

Usage: python benchmarks/determinism.py [--runs 12] [--settings AUTO AVX512 COMPATIBLE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
from collections import Counter

from _common import ROOT, write_result

TINY = {
    "recon": {"method.num_samples": 32, "method.synth_batch": 32, "method.synth_steps": 5, "method.iters": 10,
              "method.batch_size": 16},
    "adadfq": {"method.train.epochs": 2, "method.train.iters_per_epoch": 5, "method.train.batch_size": 16,
               "method.train.warmup_epochs": 0, "method.train.observe_epochs": 1},
}  # fmt: skip


def probe() -> None:
    """In this process: one short run per method; print {method: hash of Q's state dict}."""
    import torch

    import dfq
    from dfq.config import resolve_config
    from dfq.models import create_model

    torch.set_num_threads(2)
    hashes = {}
    for method, options in TINY.items():
        torch.manual_seed(0)
        config = resolve_config(None, {"method.name": method, **options})
        q = dfq.quantize(create_model("resnet20a_cifar10"), config.quant, config.method, progress=False).model
        h = hashlib.sha256()
        for value in q.state_dict().values():
            h.update(value.detach().contiguous().numpy().tobytes())
        hashes[method] = h.hexdigest()[:16]
    print(json.dumps(hashes))


def _env(setting: str) -> dict[str, str]:
    return {**os.environ, "MKL_CBWR": setting, "OMP_NUM_THREADS": "2"}


def _probe_once(setting: str) -> dict[str, str]:
    out = subprocess.run([sys.executable, __file__, "--probe"], env=_env(setting), cwd=ROOT, capture_output=True,
                         text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def _bench_once(setting: str) -> float:
    args = ["-m", "dfq", "bench", "resnet20a_cifar10", "--method", "adadfq", "--batch-size", "16", "--iters", "30"]
    out = subprocess.run([sys.executable, *args, "--json"], env=_env(setting), cwd=ROOT, capture_output=True,
                         text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["ms_median"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=12, help="probe processes per setting")
    parser.add_argument("--bench-rounds", type=int, default=3, help="dfq bench runs per setting, alternated")
    parser.add_argument("--settings", nargs="+", default=["AUTO", "AVX512", "COMPATIBLE"], help="MKL_CBWR values")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        return probe()
    if args.runs < 1 or args.bench_rounds < 1:
        parser.error("--runs and --bench-rounds must be >= 1")
    results = {s: [] for s in args.settings}
    for _ in range(args.runs):  # settings alternate, so machine load falls on all of them alike
        for s in args.settings:
            results[s].append(_probe_once(s))
    speed = {s: [] for s in args.settings}
    for _ in range(args.bench_rounds):
        for s in args.settings:
            speed[s].append(_bench_once(s))
    rows = {}
    for s in args.settings:
        per_method = {m: Counter(r[m] for r in results[s]) for m in TINY}
        rows[s] = {
            "runs": args.runs,
            "distinct_results": {m: len(c) for m, c in per_method.items()},
            "runs_per_result": {m: sorted(c.values(), reverse=True) for m, c in per_method.items()},
            "reproducible": all(len(c) == 1 for c in per_method.values()),
            "adadfq_ms_per_iteration_median": round(statistics.median(speed[s]), 1),
            "adadfq_ms_per_iteration_runs": speed[s],
        }
        print(s, json.dumps(rows[s]))
    path = write_result("determinism", {"threads": 2, "probe": TINY, "settings": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
