"""Fidelity of dfq's AdaDFQ against the official code, same model, data, CPU and schedule.

The anchor (measured on this machine with the official AdaDFQ code, see the method-study issue): resnet20a_cifar10,
68 epochs x 200 iterations, batch 16, LR milestones 17/34/51 for G and Q, everything else at the CIFAR-10 config,
one seed. The dfq side is `configs/cpu/adadfq_resnet20a_cifar10.yaml`, run with

    dfq quantize resnet20a_cifar10 --config configs/cpu/adadfq_resnet20a_cifar10.yaml --wbits B --abits B \
        --weights ../shared/data/resnet20-12fca82f.th --data ../shared/data/cifar10-test-4class-lossless.npz --out RUN

This script reads finished (or partial) run directories, evaluates the final model on both test sets and writes
benchmarks/results/fidelity_adadfq.json, replacing the rows of runs with the same name and keeping the others (whose
run directories need not exist any more). The `observer` column tells the activation-range observer of each run
(`--observer paper` reproduces the official code's EMA update, deviation 1 in docs/methods.md). The
`warmup_range_updates` column tells how often the warm-up's observation epochs updated the ranges per batch: 2 as in
the official loop, 1 for runs made before commit ef7f5b6; the `summary` keeps the two apart.

A run with `train.ema_decay` (the moving average of Q's weights, which the run evaluates and returns) also gets its
last iterate evaluated, the raw weights of the same run from its final checkpoint (`final_last_iterate`), so the
average's effect is measured on one trajectory.

The trajectory holds the run's own evaluations during training, on the set passed to `dfq quantize --data`
(`--trajectory-set jpeg75` when that was the JPEG-75 set); the final model is evaluated on both sets.

Usage: python benchmarks/fidelity_adadfq.py [--trajectory-set {lossless,jpeg75}] RUN_W4A4 [RUN_W3A3 ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import yaml
from _common import RESULTS, TEST_SETS, cli_top1, top1_on, write_result

from dfq.checkpoint import load_quantized
from dfq.train import read_train_checkpoint

OFFICIAL = {  # final top-1 after 30 minutes of the official code; and after the 4 range-calibration epochs
    4: {"lossless": 94.18, "jpeg75": 79.08, "after_calibration": {"lossless": 92.53, "jpeg75": 75.59}},
    3: {"lossless": 89.00, "jpeg75": 71.27, "after_calibration": {"lossless": 72.10, "jpeg75": 54.31}},
}
FP = {"lossless": 94.95, "jpeg75": 81.03}


def last_iterate(run: Path) -> dict[str, float]:
    """Top-1 of the run's raw last weights (the final checkpoint's Q), not of their moving average."""
    model, _ = load_quantized(run)
    model.load_state_dict(read_train_checkpoint(run)["student"])
    return top1_on(model, TEST_SETS)


def warmup_range_updates(metrics: list[dict]) -> int:
    """Range updates per batch in the warm-up's observation epochs: 2 (the G step's Q forward and the Q loss's, as in
    the official loop) when the run logged Q's loss there, 1 for runs made before dfq computed it (commit ef7f5b6).
    Read from the first warm-up epoch: a run started before that commit and resumed after it counts as 1."""
    warm = [m for m in metrics if not m["train_q"]]
    return 2 if warm and "q_loss" in warm[0] else 1


def describe(run: Path, trajectory_set: str) -> dict:
    config = yaml.safe_load((run / "config.yaml").read_text())
    bits = config["quant"]["wbits"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trajectory = [{"epoch": m["epoch"], f"top1_{trajectory_set}": m["top1"]} for m in metrics if "top1" in m]
    row = {
        "run": run.name,
        "wbits": bits,
        "abits": config["quant"]["abits"],
        "epochs_done": len(metrics),
        "epochs_planned": config["train"]["epochs"],
        "observer": config["quant"].get("act_observer", "ema"),
        "warmup_range_updates": warmup_range_updates(metrics),
        "train_seconds": metrics[-1]["train_seconds"] if metrics else None,
        "official": OFFICIAL.get(bits),
        "fp": FP,
        "trajectory": trajectory,
    }
    if (run / "model.pt").is_file():
        final = cli_top1([str(run)])
        row["final"] = final
        if config["train"].get("ema_decay"):
            row["ema_decay"] = config["train"]["ema_decay"]
            row["final_last_iterate"] = last_iterate(run)
        if bits in OFFICIAL:
            row["final_minus_official"] = {k: round(final[k] - OFFICIAL[bits][k], 2) for k in final}
    return row


def summarize(rows: list[dict], after_epoch: int = 20) -> dict[str, dict]:
    """Per bit-width and warm-up range updates per batch (rows from before commit ef7f5b6 have 1), over every
    finished run: the last iterates' lossless top-1, and where the official single
    final lies in the distribution of the runs' lossless evaluations after `after_epoch` (the eval-to-eval swing;
    runs with `ema_decay` evaluated their average, so their evaluations are left out)."""
    out = {}
    for (bits, official), updates in itertools.product(OFFICIAL.items(), (1, 2)):
        done = [r for r in rows if r["wbits"] == bits and "final" in r and r.get("warmup_range_updates", 1) == updates]
        late = [
            t["top1_lossless"]
            for r in done
            if "ema_decay" not in r
            for t in r["trajectory"]
            if "top1_lossless" in t and t["epoch"] >= after_epoch
        ]
        if len(late) < 2:
            continue
        finals = [r.get("final_last_iterate", r["final"])["lossless"] for r in done]
        out[f"w{bits}a{bits}_warmup_range_updates_{updates}"] = {
            "runs": len(done),
            "last_iterate_lossless": {
                "min": min(finals),
                "max": max(finals),
                "mean": round(statistics.mean(finals), 3),
            },
            f"evaluations_after_epoch_{after_epoch}": {
                "count": len(late),
                "mean": round(statistics.mean(late), 3),
                "stdev": round(statistics.stdev(late), 3),
                "at_or_above_official": sum(v >= official["lossless"] for v in late),
            },
            "official_lossless": official["lossless"],
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--trajectory-set", choices=("lossless", "jpeg75"), default="lossless")
    args = parser.parse_args()
    rows = [describe(r, args.trajectory_set) for r in args.runs]
    for r in rows:
        print(json.dumps({k: r[k] for k in r if k != "trajectory"}))
    new = {r["run"] for r in rows}
    old = RESULTS / "fidelity_adadfq.json"
    kept = [r for r in json.loads(old.read_text())["results"] if r["run"] not in new] if old.is_file() else []
    results = kept + rows
    summary = summarize(results)
    print(json.dumps(summary))
    payload = {"model": "resnet20a_cifar10", "method": "adadfq", "summary": summary, "results": results}
    print(f"wrote {write_result('fidelity_adadfq', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
