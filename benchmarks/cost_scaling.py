"""How the cost of one training iteration grows with the batch size and with the model.

`dfq bench` (exact mode, random weights, each configuration in its own process so peak RSS is its own) for AdaDFQ W4A4
on resnet20a_cifar10 at batch 16 to 256, and on the CIFAR ResNets 20 / 32 / 44 / 56 at one batch size. Reports the
median milliseconds per iteration, per image, peak RSS, and the fitted growth (log-log slope) of each.

Usage: python benchmarks/cost_scaling.py [--iters 8] [--method adadfq] [--model-batch 64]
Writes benchmarks/results/cost_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from _common import run_cli, write_result

BATCHES = (16, 32, 64, 128, 256)
MODELS = {"resnet20a_cifar10": 0.27, "resnet32a_cifar10": 0.46, "resnet44a_cifar10": 0.66, "resnet56a_cifar10": 0.85}
# millions of parameters (He et al. 2016, Table 6)


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x: 1.0 means linear growth."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def bench(model: str, method: str, batch: int, iters: int) -> dict:
    cmd = ["bench", model, "--method", method, "--batch-size", str(batch), "--iters", str(iters), "--warmup", "2"]
    r = run_cli(cmd)
    row = {k: r[k] for k in ("model", "batch_size", "ms_median", "ms_min", "ms_max", "lower_bound_ms", "peak_rss_mib")}
    row.update(ms_per_image=round(r["ms_median"] / batch, 2), command="dfq " + " ".join(cmd))
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--method", default="adadfq")
    parser.add_argument("--model-batch", type=int, default=64)
    args = parser.parse_args()
    by_batch = [bench("resnet20a_cifar10", args.method, b, args.iters) for b in BATCHES]
    by_model = [bench(m, args.method, args.model_batch, args.iters) for m in MODELS]
    growth = {
        "time_vs_batch": round(slope(list(BATCHES), [r["ms_median"] for r in by_batch]), 3),
        "memory_vs_batch": round(slope(list(BATCHES), [r["peak_rss_mib"] for r in by_batch]), 3),
        "time_vs_depth": round(slope([20, 32, 44, 56], [r["ms_median"] for r in by_model]), 3),
        "memory_vs_depth": round(slope([20, 32, 44, 56], [r["peak_rss_mib"] for r in by_model]), 3),
    }
    payload = {
        "method": args.method,
        "bits": 4,
        "params_millions": MODELS,
        "by_batch": by_batch,
        "by_model": by_model,
        "log_log_slopes": growth,
    }
    print(json.dumps(growth))
    print(f"wrote {write_result('cost_scaling', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
