"""ZeroQ baseline on resnet20a_cifar10 at several bit-widths, on both ../shared/data test sets.

Usage: python benchmarks/zeroq_cifar10.py [--bits 8 6 4] [--seed 0]
Writes benchmarks/results/zeroq_resnet20a_cifar10.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _common import JPEG, LOSSLESS, WEIGHTS, cli_top1, run_cli, write_result

SETS = {
    "4class-lossless": LOSSLESS,  # the key this result file has always used
    "jpeg75": JPEG,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 6, 4])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not WEIGHTS.is_file():
        print(f"skipped: {WEIGHTS} not found", file=sys.stderr)
        return 0
    rows = []
    fp = cli_top1(["resnet20a_cifar10", "--weights", str(WEIGHTS)], SETS)
    with tempfile.TemporaryDirectory() as tmp:
        for bits in args.bits:
            out = Path(tmp) / f"w{bits}a{bits}"
            cmd = [
                "quantize",
                "resnet20a_cifar10",
                "--method",
                "zeroq",
                "--wbits",
                str(bits),
                "--abits",
                str(bits),
                "--weights",
                str(WEIGHTS),
                "--seed",
                str(args.seed),
                "--out",
                str(out),
            ]
            summary = run_cli(cmd)
            row = {"wbits": bits, "abits": bits, "seconds": summary["seconds"], "command": "dfq " + " ".join(cmd)}
            for name, top1 in cli_top1([str(out)], SETS).items():
                row[name] = {"top1": top1, "fp_top1": fp[name], "drop": round(fp[name] - top1, 2)}
            rows.append(row)
            print(row, flush=True)
    path = write_result(
        "zeroq_resnet20a_cifar10", {"model": "resnet20a_cifar10", "method": "zeroq", "seed": args.seed, "results": rows}
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
