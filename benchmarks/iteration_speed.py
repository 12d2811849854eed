"""Milliseconds per training iteration and peak memory of each method at its paper batch size.

Times the engine's real iteration (G step + Q step(s), Q trained, ranges frozen: the
steady state after the observation window) on resnet20a_cifar10 with random weights
(timings do not depend on them). Each method runs in its own process so that peak RSS
is its own.

Usage: python benchmarks/iteration_speed.py [--iters 30] [--threads 2] [--methods gdfq zaq adasg adadfq]
Writes benchmarks/results/iteration_speed.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from _common import write_result

PAPER_BATCH = {"gdfq": 200, "zaq": 256, "adasg": 16, "adadfq": 16}


def measure(method: str, batch: int, iters: int, warmup: int, threads: int, wbits: int) -> dict:
    import torch

    from dfq.config import resolve_config
    from dfq.models import create_model
    from dfq.quant import calibrate
    from dfq.train import Game
    from dfq.utils.seed import seed_everything

    torch.set_num_threads(threads)
    # Random weights: a tiny Q learning rate keeps Q finite; a step costs the same at any learning rate.
    config = resolve_config(None, {"method.name": method, "method.train.batch_size": batch, "method.train.q_lr": 1e-9,
                                   "quant.wbits": wbits, "quant.abits": wbits})  # fmt: skip
    seed_everything(config.seed)
    game = Game(config.create_method(), create_model("resnet20a_cifar10"), config.quant, num_classes=10,
                input_size=(3, 32, 32), seed=config.seed)  # fmt: skip
    calibrate(game.student, [torch.randn(batch, 3, 32, 32)])  # steady state: frozen ranges
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        game.iteration(train_q=True)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return {
        "method": method,
        "batch_size": batch,
        "iters": iters,
        "threads": threads,
        "ms_median": round(statistics.median(times), 2),
        "ms_min": round(min(times), 2),
        "ms_max": round(max(times), 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", nargs="+", default=list(PAPER_BATCH))
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--single", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        print(json.dumps(measure(args.single, args.batch, args.iters, args.warmup, args.threads, args.bits)))
        return 0
    rows = []
    for m in args.methods:
        # ZAQ at batch 256 takes about a minute per iteration on 2 cores: a few iterations suffice.
        iters, warmup = (min(args.iters, 3), 1) if m == "zaq" else (args.iters, args.warmup)
        cmd = [
            sys.executable,
            __file__,
            "--single",
            m,
            "--batch",
            str(PAPER_BATCH[m]),
            "--iters",
            str(iters),
            "--warmup",
            str(warmup),
            "--threads",
            str(args.threads),
            "--bits",
            str(args.bits),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            rows.append({"method": m, "batch_size": PAPER_BATCH[m], "error": proc.stderr.strip().splitlines()[-1]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    path = write_result(
        "iteration_speed",
        {
            "model": "resnet20a_cifar10",
            "wbits": args.bits,
            "abits": args.bits,
            "results": rows,
            "note": "ZAQ's iteration is 5 Q steps + 1 G step, at batch 256",
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
