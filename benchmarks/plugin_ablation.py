"""Ablation of the engine plug-ins: one generator-based method at one bit-width, each plug-in alone and all together,
under the same CPU-time budget (the method study's schedule fitting: the preset's epochs and milestones, iterations
per epoch fitted to the budget by timing the plain iteration once).

The plug-in settings are general ones (SynQ's τ = 0.7 for CIFAR-10; a low-pass σ of 0.5 Nyquist; Grad-CAM weight
100, which makes its gradient on Q 5-10% of the method's own (measured on resnet20a at the start of training:
the MSE of unit-norm maps is small). The final model is evaluated on both test sets, with no selection on them.

Usage: python benchmarks/plugin_ablation.py [--method adadfq] [--bits 4] [--budget-min 5] [--root runs/ablation]
Writes benchmarks/results/plugin_ablation.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from _common import JPEG, LOSSLESS, ROOT, WEIGHTS, cli_top1, run_cli, write_result
from method_study import fit_schedule, preset

VARIANTS = {
    "baseline": {},
    "lowpass": {"lowpass": 0.5},
    "hard_tau": {"hard_tau": 0.7},
    "cam": {"cam_weight": 100.0},
    "lsq": {"lsq": True},
    "adaround": {"adaround": True},
    "all": {"lowpass": 0.5, "hard_tau": 0.7, "cam_weight": 100.0, "lsq": True, "adaround": True},
}


def run_variant(name: str, method: str, bits: int, root: Path, schedule: dict) -> dict:
    out = root / f"{method}-w{bits}a{bits}-{name}"
    config = yaml.safe_load((ROOT / preset(method)).read_text())
    config["method"]["plugins"] = VARIANTS[name]
    config_path = root / f"{out.name}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = ["quantize", "resnet20a_cifar10", "--method", method, "--wbits", str(bits), "--abits", str(bits),
           "--weights", str(WEIGHTS), "--config", str(config_path), "--set",
           f"method.train.iters_per_epoch={schedule['iters_per_epoch']}", "--set", "method.train.eval_every=1000",
           "--data", str(LOSSLESS), "--out", str(out)]  # fmt: skip
    if (out / "summary.json").is_file():
        summary = json.loads((out / "summary.json").read_text())
    else:
        summary = run_cli([*cmd, "--overwrite"])
    jpeg = run_cli(["eval", str(out), "--data", str(JPEG)])["top1"]
    return {"variant": name, "plugins": VARIANTS[name], "command": "dfq " + " ".join(cmd),
            "seconds": summary["seconds"], "lossless": summary["top1"], "jpeg75": jpeg}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", default="adadfq")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--budget-min", type=float, default=5.0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "ablation")
    args = parser.parse_args()
    if not WEIGHTS.is_file():
        print(f"skipped: {WEIGHTS} not found", file=sys.stderr)
        return 0
    args.root.mkdir(parents=True, exist_ok=True)
    plan = args.root / f"{args.method}-w{args.bits}a{args.bits}.schedule.json"
    if not plan.is_file():  # one schedule for every variant: equal iterations, so the time shows each plug-in's cost
        plan.write_text(json.dumps(fit_schedule(args.method, args.bits, args.budget_min * 60)))
    schedule = json.loads(plan.read_text())
    fp = cli_top1(["resnet20a_cifar10", "--weights", str(WEIGHTS)])
    rows = []
    for name in args.variants:
        rows.append(run_variant(name, args.method, args.bits, args.root, schedule))
        print(json.dumps(rows[-1]), flush=True)
        path = write_result("plugin_ablation", {"model": "resnet20a_cifar10", "method": args.method, "wbits": args.bits,
                                                "abits": args.bits, "budget_min": args.budget_min, "schedule": schedule,
                                                "fp_top1": fp, "results": rows})  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
