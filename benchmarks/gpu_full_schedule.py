"""The paper's full AdaDFQ schedule on a lent GPU: how far it got, how fast, and what the rest would cost.

The run was made on the device machine (one NVIDIA H200) from the repository root, with the data copied beside it:

    python3 -m dfq quantize resnet20a_cifar10 --config configs/adadfq/cifar10_resnet20_w4a4.yaml \
        --weights .devdata/resnet20-12fca82f.th --data .devdata/cifar10-test-4class-lossless.npz \
        --eval-every 20 --device cuda --no-progress --out runs/gpu-full-adadfq-w4a4 --json

under `timeout -s TERM 540` (the device lease is 15 minutes in all). SIGTERM stops the run after the current
iteration with a resumable checkpoint. This script reads that run directory (fetched back) and writes
benchmarks/results/gpu_full_schedule.json: epochs done, seconds per epoch and per iteration on the GPU, the
evaluations made, and the training time the whole schedule would need at that speed (a lower bound on device time:
evaluations, checkpoints and the machine's start come on top).

Usage: python benchmarks/gpu_full_schedule.py RUN --device "NVIDIA H200, driver ..., torch ..."
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml
from _common import write_result

DEVICE_COMMAND = (
    "timeout -s TERM 540 python3 -m dfq quantize resnet20a_cifar10 --config configs/adadfq/cifar10_resnet20_w4a4.yaml "
    "--weights .devdata/resnet20-12fca82f.th --data .devdata/cifar10-test-4class-lossless.npz --eval-every 20 "
    "--device cuda --no-progress --out runs/gpu-full-adadfq-w4a4 --json"
)


def describe(run: Path) -> dict:
    train = yaml.safe_load((run / "config.yaml").read_text())["train"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    seconds = [m["train_seconds"] for m in metrics]
    per_epoch = [b - a for a, b in zip([0.0, *seconds], seconds, strict=False)]
    q_epochs = [s for m, s in zip(metrics, per_epoch, strict=True) if m["train_q"]] or per_epoch
    epoch_s = statistics.median(q_epochs)
    planned = train["epochs"]
    return {
        "run": run.name,
        "schedule": {k: train[k] for k in ("epochs", "iters_per_epoch", "batch_size", "q_milestones", "warmup_epochs")},
        "epochs_done": len(metrics),
        "train_seconds": seconds[-1],
        "median_epoch_seconds_q_training": round(epoch_s, 3),
        "ms_per_iteration_q_training": round(1000 * epoch_s / train["iters_per_epoch"], 1),
        "projected_training_minutes_full_schedule": round((seconds[-1] + epoch_s * (planned - len(metrics))) / 60, 1),
        "trajectory_lossless": [{"epoch": m["epoch"], "top1": m["top1"]} for m in metrics if "top1" in m],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--device", required=True, help="the device as the run reported it")
    args = parser.parse_args()
    row = describe(args.run)
    print(json.dumps(row))
    payload = {"model": "resnet20a_cifar10", "method": "adadfq", "device": args.device,
               "device_command": DEVICE_COMMAND, "result": row}  # fmt: skip
    print(f"wrote {write_result('gpu_full_schedule', payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
