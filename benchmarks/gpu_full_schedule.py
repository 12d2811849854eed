"""The paper's full AdaDFQ schedule on a lent GPU: how far it got, how fast, and what the rest would cost.

The run was made on the device machine (one NVIDIA H200) from the repository root, with the data copied beside it:

    python3 -m dfq quantize resnet20a_cifar10 --config configs/adadfq/cifar10_resnet20_w4a4.yaml \
        --weights .devdata/resnet20-12fca82f.th --data .devdata/cifar10-test-4class-lossless.npz \
        --eval-every 20 --device cuda --no-progress --out runs/gpu-full-adadfq-w4a4 --json

under `timeout -s TERM 540` (the device lease is 15 minutes in all). SIGTERM stops the run after the current
iteration with a resumable checkpoint. The rest of the schedule can be finished on this CPU from that checkpoint:

    dfq quantize resnet20a_cifar10 --config RUN/config.yaml --data LOSSLESS --device cpu --out RUN --resume

This script reads the run directory and writes benchmarks/results/gpu_full_schedule.json: epochs done, seconds per
epoch and per iteration on the GPU (the first `--device-epochs` epochs) and on the CPU (the rest), the evaluations
made, the training time the whole schedule would need at the GPU's speed (a lower bound on device time: evaluations,
checkpoints and the machine's start come on top) and, once the run has finished, its final model's top-1 on both
test sets. The epoch the device run was stopped in is counted as CPU time (the medians hide it).

Usage: python benchmarks/gpu_full_schedule.py RUN --device "NVIDIA H200, driver ..., torch ..." [--device-epochs N]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml
from _common import TEST_SETS, top1_on, write_result

from dfq.checkpoint import load_quantized

DEVICE_COMMAND = (
    "timeout -s TERM 540 python3 -m dfq quantize resnet20a_cifar10 --config configs/adadfq/cifar10_resnet20_w4a4.yaml "
    "--weights .devdata/resnet20-12fca82f.th --data .devdata/cifar10-test-4class-lossless.npz --eval-every 20 "
    "--device cuda --no-progress --out runs/gpu-full-adadfq-w4a4 --json"
)
CPU_COMMAND = (  # the continuation on this machine, as run; --resume takes the config from the run directory
    "dfq quantize resnet20a_cifar10 --config runs/gpu-full-adadfq-w4a4/config.yaml "
    "--data .devdata/cifar10-test-4class-lossless.npz --device cpu --no-progress --json "
    "--out runs/gpu-full-adadfq-w4a4 --resume"
)


def q_epoch_seconds(metrics: list[dict], per_epoch: list[float]) -> float:
    """Median seconds of the epochs that train Q (warm-up epochs train G alone)."""
    q_epochs = [s for m, s in zip(metrics, per_epoch, strict=True) if m["train_q"]] or per_epoch
    return statistics.median(q_epochs)


def describe(run: Path, device_epochs: int | None) -> dict:
    train = yaml.safe_load((run / "config.yaml").read_text())["train"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    seconds = [m["train_seconds"] for m in metrics]
    per_epoch = [b - a for a, b in zip([0.0, *seconds], seconds, strict=False)]
    on_device = len(metrics) if device_epochs is None else device_epochs
    if not 1 <= on_device <= len(metrics):
        raise SystemExit(f"--device-epochs must be between 1 and the {len(metrics)} epochs done, got {on_device}")
    epoch_s = q_epoch_seconds(metrics[:on_device], per_epoch[:on_device])
    planned, iters = train["epochs"], train["iters_per_epoch"]
    device_seconds = seconds[on_device - 1]
    row = {
        "run": run.name,
        "schedule": {k: train[k] for k in ("epochs", "iters_per_epoch", "batch_size", "q_milestones", "warmup_epochs")},
        "epochs_done": len(metrics),
        "epochs_on_device": on_device,
        "train_seconds": seconds[-1],
        "train_seconds_on_device": device_seconds,
        "median_epoch_seconds_q_training": round(epoch_s, 3),
        "ms_per_iteration_q_training": round(1000 * epoch_s / iters, 1),
        "projected_training_minutes_full_schedule": round((device_seconds + epoch_s * (planned - on_device)) / 60, 1),
        "trajectory_lossless": [{"epoch": m["epoch"], "top1": m["top1"]} for m in metrics if "top1" in m],
    }  # fmt: skip
    if on_device < len(metrics):
        cpu_s = q_epoch_seconds(metrics[on_device:], per_epoch[on_device:])
        row["cpu_continuation"] = {"epochs": len(metrics) - on_device, "median_epoch_seconds": round(cpu_s, 3),
                                   "ms_per_iteration": round(1000 * cpu_s / iters, 1)}  # fmt: skip
    if (run / "model.pt").is_file():
        model, _ = load_quantized(run)
        row["final"] = top1_on(model, TEST_SETS)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--device", required=True, help="the device as the run reported it")
    parser.add_argument("--device-epochs", type=int, help="epochs run on the device; the rest ran on this CPU")
    args = parser.parse_args()
    row = describe(args.run, args.device_epochs)
    print(json.dumps(row))
    payload = {"model": "resnet20a_cifar10", "method": "adadfq", "device": args.device,
               "device_command": DEVICE_COMMAND,
               **({"cpu_command": CPU_COMMAND} if "cpu_continuation" in row else {}), "result": row}  # fmt: skip
    print(f"wrote {write_result('gpu_full_schedule', payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
