"""The method study: every method on resnet20a_cifar10 at W4A4 and W3A3 under one CPU-time budget.

Each generator-based method keeps its CPU preset (`configs/cpu/<method>_resnet20a_cifar10.yaml`: batch size,
epochs, learning-rate milestones, observation window) and gets as many iterations per epoch as fit the budget:
its iteration is timed first with `dfq bench` on this machine, then `iters_per_epoch = budget / (epochs x ms)`.
The post-training methods (zeroq, recon) run their defaults and report their own time. Evaluations during
training use the 4-class lossless set (they are not counted in the time); the final model, with no selection
on the test set, is then evaluated on both sets. Runs whose directory already holds a summary are reused, so
an interrupted study continues where it stopped.

With `--fast` the generator-based methods run in fast mode (`--set method.train.fast=true`: bfloat16 autocast), their
iteration timed in fast mode too, so the same budget buys more iterations; these rows carry `"fast": true` and
sit beside the exact ones.

Usage: python benchmarks/method_study.py [--budget-min 10] [--methods ...] [--bits 4 3] [--fast] [--root runs/study]
Writes benchmarks/results/method_study.json, or `--results NAME`.json (merging rows of other bit-widths, methods
and modes already there).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from _common import LOSSLESS, RESULTS, ROOT, WEIGHTS, cli_top1, run_cli, write_result

GAME = ("gdfq", "zaq", "adasg", "adadfq")
# Exceptions to the papers' protocol, reported in their own rows: Genie's / BRECQ's / QDrop's first and last layer
# at 8 bits (`--ends-bits 8`: the first convolution's weights and its output, which is the second layer's input;
# the classifier's weights and its input, the pooled output of the last block).
EXCEPTIONS = {"none": [], "genie": ["--ends-bits", "8"]}


def preset(method: str) -> Path:
    return Path("configs/cpu") / f"{method}_resnet20a_cifar10.yaml"


def fit_schedule(method: str, bits: int, budget_s: float, fast: bool = False) -> dict:
    """Iterations per epoch that make the preset's epochs take about ``budget_s`` on this machine."""
    train = yaml.safe_load((ROOT / preset(method)).read_text())["train"]
    iters = 3 if method == "zaq" else 15  # a ZAQ iteration is 5 Q steps + 1 G step
    probe = run_cli(["bench", "resnet20a_cifar10", "--method", method, "--batch-size", str(train["batch_size"]),
                     "--bits", str(bits), "--iters", str(iters), "--warmup", "2", *(["--fast"] * fast)])  # fmt: skip
    per_epoch = max(1, round(budget_s / (train["epochs"] * probe["ms_median"] / 1000)))
    return {"epochs": train["epochs"], "iters_per_epoch": per_epoch, "batch_size": train["batch_size"],
            "probe_ms_median": probe["ms_median"]}  # fmt: skip


def run_one(
    method: str, bits: int, root: Path, budget_s: float, fp: dict[str, float], fast: bool = False,
    exceptions: str = "none",
) -> dict:  # fmt: skip
    fast = fast and method in GAME
    suffix = ("-fast" if fast else "") + ("" if exceptions == "none" else f"-{exceptions}")
    out = root / f"{method}-w{bits}a{bits}{suffix}"
    cmd = ["quantize", "resnet20a_cifar10", "--method", method, "--wbits", str(bits), "--abits", str(bits),
           "--weights", str(WEIGHTS), "--data", str(LOSSLESS), "--out", str(out)]  # fmt: skip
    cmd += EXCEPTIONS[exceptions]
    schedule = None
    if method in GAME:
        plan = root / f"{out.name}.schedule.json"  # the fitted schedule is kept: a rerun reuses it
        if not plan.is_file():
            plan.parent.mkdir(parents=True, exist_ok=True)
            plan.write_text(json.dumps(fit_schedule(method, bits, budget_s, fast)))
        schedule = json.loads(plan.read_text())
        cmd += ["--config", str(preset(method)), "--set", f"method.train.iters_per_epoch={schedule['iters_per_epoch']}"]
        cmd += ["--set", "method.train.fast=true"] if fast else []
    if (out / "summary.json").is_file():
        summary = json.loads((out / "summary.json").read_text())
    else:
        summary = run_cli([*cmd, "--overwrite"])
    final = cli_top1([str(out)])
    row = {
        "method": method,
        "wbits": bits,
        "abits": bits,
        "fast": fast,
        "exceptions": exceptions,
        "command": "dfq " + " ".join(cmd),
        "seconds": summary["seconds"],
        **{k: {"top1": final[k], "fp_top1": fp[k], "drop": round(fp[k] - final[k], 2)} for k in final},
    }
    if schedule:
        row["schedule"] = schedule
        row["lossless"]["top1_best_test_selected"] = summary.get("top1_best")
        row["lossless"]["best_epoch"] = summary.get("best_epoch")
    return row


def _key(row: dict) -> tuple:
    return row["method"], row["wbits"], row.get("fast", False), row.get("exceptions", "none")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", nargs="+", default=["zeroq", "recon", *GAME])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--budget-min", type=float, default=10.0, help="CPU minutes per generator-based run")
    parser.add_argument("--fast", action="store_true", help="generator-based methods in fast mode")
    parser.add_argument(
        "--exceptions", choices=list(EXCEPTIONS), default="none", help="layers kept at 8 bits (own rows)"
    )
    parser.add_argument("--results", default="method_study", help="name of the JSON under benchmarks/results/")
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "study")
    args = parser.parse_args()
    if not WEIGHTS.is_file():
        print(f"skipped: {WEIGHTS} not found", file=sys.stderr)
        return 0
    old = RESULTS / f"{args.results}.json"
    rows = json.loads(old.read_text())["results"] if old.is_file() else []
    fp = cli_top1(["resnet20a_cifar10", "--weights", str(WEIGHTS)])
    for bits in args.bits:
        for method in args.methods:
            row = run_one(method, bits, args.root, args.budget_min * 60, fp, args.fast, args.exceptions)
            key = (method, bits, row["fast"], args.exceptions)
            rows = [r for r in rows if _key(r) != key] + [row]
            print(json.dumps(row), flush=True)
            path = write_result(args.results, {"model": "resnet20a_cifar10", "budget_min": args.budget_min,
                                                 "results": rows})  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
