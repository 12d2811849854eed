"""The method study: every method on resnet20a_cifar10 at W4A4 and W3A3 with its CPU preset.

Each generator-based method runs its `configs/cpu/<method>_resnet20a_cifar10.yaml` schedule (about the same CPU
time each); ZeroQ runs its default. Evaluations during training use the 4-class lossless set; the final model is
then evaluated on both sets. Runs whose directory already holds a summary are reused, so an interrupted study
continues where it stopped.

Usage: python benchmarks/method_study.py [--methods zeroq gdfq zaq adasg adadfq] [--bits 4 3] [--root runs/study]
Writes benchmarks/results/method_study.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import ROOT, SHARED_DATA, run_cli, write_result

WEIGHTS = SHARED_DATA / "resnet20-12fca82f.th"
LOSSLESS = SHARED_DATA / "cifar10-test-4class-lossless.npz"
JPEG = SHARED_DATA / "cifar10-test-jpeg75.npz"


def run_one(method: str, bits: int, root: Path) -> dict:
    out = root / f"{method}-w{bits}a{bits}"
    cmd = [
        "quantize",
        "resnet20a_cifar10",
        "--method",
        method,
        "--wbits",
        str(bits),
        "--abits",
        str(bits),
        "--weights",
        str(WEIGHTS),
        "--data",
        str(LOSSLESS),
        "--out",
        str(out),
    ]
    if method != "zeroq":
        cmd += ["--config", f"configs/cpu/{method}_resnet20a_cifar10.yaml"]
    if (out / "summary.json").is_file():
        summary = json.loads((out / "summary.json").read_text())
    else:
        summary = run_cli([*cmd, "--overwrite"])
    jpeg = run_cli(["eval", str(out), "--data", str(JPEG)])
    fp_jpeg = run_cli(["eval", "resnet20a_cifar10", "--weights", str(WEIGHTS), "--data", str(JPEG)])["top1"]
    row = {
        "method": method,
        "wbits": bits,
        "abits": bits,
        "command": "dfq " + " ".join(cmd),
        "train_seconds": summary["seconds"],
        "lossless": {
            "top1": summary["top1"],
            "fp_top1": summary["fp_top1"],
            "drop": round(summary["fp_top1"] - summary["top1"], 2),
        },
        "jpeg75": {"top1": jpeg["top1"], "fp_top1": fp_jpeg, "drop": round(fp_jpeg - jpeg["top1"], 2)},
    }
    if "top1_best" in summary:
        row["lossless"]["top1_best_test_selected"] = summary["top1_best"]
        row["lossless"]["best_epoch"] = summary["best_epoch"]
        row["schedule"] = {k: summary[k] for k in ("epochs", "iters_per_epoch", "batch_size")}
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", nargs="+", default=["zeroq", "gdfq", "zaq", "adasg", "adadfq"])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "study")
    args = parser.parse_args()
    if not WEIGHTS.is_file():
        print(f"skipped: {WEIGHTS} not found", file=sys.stderr)
        return 0
    rows = []
    for bits in args.bits:
        for method in args.methods:
            rows.append(run_one(method, bits, args.root))
            print(json.dumps(rows[-1]), flush=True)
    path = write_result("method_study", {"model": "resnet20a_cifar10", "results": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
