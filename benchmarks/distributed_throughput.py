"""Iteration speed and peak memory of the ImageNet models, and the scaling from 1 to 2 processes.

Part 1, ``models``: ResNet-18, ResNet-50 and MobileNetV2 at 224x224 with each method's paper ImageNet preset
(``configs/<method>/imagenet_<model>_w4a4.yaml``: its batch size and schedule), random weights (timings do not
depend on them), one process per configuration so that peak memory is its own. Two iterations are timed: a
warm-up one (G step only; Q's loss computed without gradients where the method does) and a Q-training one
(ranges frozen). The full-schedule cost is **extrapolated** from them:
``warmup_epochs x iters_per_epoch x t_warmup + (epochs - warmup_epochs) x iters_per_epoch x t_train``
(no evaluation, no checkpoints; the range-observation epochs timed as frozen ones).

Part 2, ``scaling``: ``resnet20a_cifar10`` (CIFAR input) under ``torchrun`` with 1 and 2 processes at the same
global batch, on the same cores: 1 process x 2 threads against 2 processes x 1 thread (and 1 x 1 for reference).

Usage (on an otherwise idle machine):
    python benchmarks/distributed_throughput.py                      # CPU: both parts, AdaDFQ
    python benchmarks/distributed_throughput.py --device cuda --methods gdfq zaq adasg adadfq --nproc 1 2 4 8
Writes benchmarks/results/distributed_throughput[_<device>].json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import ROOT, write_result

MODELS = ("resnet18", "resnet50", "mobilenetv2")


# ------------------------------------------------------------------------------------- in one process
def _game(model: str, method: str, batch: int | None, device: str, fast: bool, input_size: int | None = None):
    from dfq.config import load_yaml, resolve_config
    from dfq.distributed import DistContext
    from dfq.models import create_model
    from dfq.train import Game

    preset = ROOT / "configs" / method / f"imagenet_{model}_w4a4.yaml"
    overrides = {"method.name": method, "model": model, "method.train.batch_size": batch,
                 "method.train.fast": fast or None}  # fmt: skip
    config = resolve_config(load_yaml(preset) if preset.is_file() else {}, overrides)
    torch.manual_seed(0)  # P's random weights, then G's and Q's initial ones
    p = create_model(model)
    info = p.dfq_info
    size = (3, input_size, input_size) if input_size else info.input_size
    return Game(config.create_method(), p, config.quant, num_classes=info.num_classes, input_size=size,
                seed=config.seed, dist=DistContext.current(device))  # fmt: skip


def _timed(fn, iters: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker_model(args: argparse.Namespace) -> dict:
    """One model x method: a warm-up iteration and a Q-training iteration, timed."""
    from dfq.quant import ActMode, set_act_mode

    e = _game(args.model, args.method, args.batch, args.device, args.fast, args.input_size)
    e.iteration(False)  # observes the ranges once, as the first iteration of a run does
    set_act_mode(e.student, ActMode.FROZEN)
    warm = _timed(lambda: e.iteration(False), args.iters, args.warmup, e.device)
    train = _timed(lambda: e.iteration(True), args.iters, args.warmup, e.device)
    t = e.train
    warm_ms, train_ms = statistics.median(warm), statistics.median(train)
    warm_iters, total_iters = t.warmup_epochs * t.iters_per_epoch, t.epochs * t.iters_per_epoch
    full_s = (warm_iters * warm_ms + (total_iters - warm_iters) * train_ms) / 1e3
    return {
        "model": args.model,
        "method": args.method,
        "batch_size": t.batch_size,
        "device": str(e.device),
        "fast": t.fast,
        "threads": torch.get_num_threads(),
        "timed_iterations": args.iters,
        "warmup_ms": [round(x, 1) for x in warm],
        "train_ms": [round(x, 1) for x in train],
        "warmup_ms_median": round(warm_ms, 1),
        "train_ms_median": round(train_ms, 1),
        "train_iters_per_s": round(1e3 / train_ms, 4),
        "train_images_per_s": round(1e3 * t.batch_size / train_ms, 2),
        "peak_mib": round(_peak_mib(e.device), 1),
        "schedule": {"epochs": t.epochs, "iters_per_epoch": t.iters_per_epoch, "warmup_epochs": t.warmup_epochs},
        "full_schedule_hours_extrapolated": round(full_s / 3600, 2),
    }


def worker_scaling(args: argparse.Namespace) -> dict | None:
    """Under torchrun: the data-parallel iteration (Q training, ranges frozen) on this rank."""
    from dfq.distributed import process_group
    from dfq.quant import ActMode, set_act_mode

    with process_group(args.device) as ctx:
        e = _game("resnet20a_cifar10", args.method, args.batch, str(ctx.device), args.fast)
        e.iteration(False)
        set_act_mode(e.student, ActMode.FROZEN)
        times = _timed(lambda: e.iteration(True), args.iters, args.warmup, e.device)
        peaks = ctx.gather_objects(_peak_mib(e.device))
    if not ctx.main:
        return None
    ms = statistics.median(times)
    return {
        "processes": ctx.world_size,
        "threads_per_process": torch.get_num_threads(),
        "global_batch": args.batch,
        "timed_iterations": args.iters,
        "ms": [round(x, 1) for x in times],
        "ms_median": round(ms, 1),
        "images_per_s": round(1e3 * args.batch / ms, 1),
        "peak_mib_per_process": [round(p, 1) for p in peaks],
    }


# ------------------------------------------------------------------------------------------- driver
def _run(cmd: list[str], env: dict[str, str]) -> dict:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env})
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _worker_cmd(kind: str, args: argparse.Namespace, **extra: object) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--device", args.device]
    cmd += ["--iters", str(args.iters), "--warmup", str(args.warmup), *(["--fast"] if args.fast else [])]
    for key, value in extra.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=["adadfq"])
    parser.add_argument("--iters", type=int, default=3, help="timed iterations of each kind (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads of part 1")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts of part 2")
    parser.add_argument("--scaling-batch", type=int, default=64, help="global batch of part 2")
    parser.add_argument("--skip", choices=["models", "scaling"], help="leave one part out")
    parser.add_argument("--fast", action="store_true", help="bfloat16 autocast and channels-last (--amp)")
    parser.add_argument("--smoke", action="store_true", help="check the script: 32-pixel inputs, batch 4, no file")
    parser.add_argument("--worker", choices=["model", "scaling"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="adadfq", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--input-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = (worker_model if args.worker == "model" else worker_scaling)(args)
        if result is not None:
            print(json.dumps(result), flush=True)
        return 0

    payload: dict = {"device": args.device, "extrapolation": __doc__.split("Part 2")[0].strip()}
    if args.skip != "models":
        rows = []
        for model in args.models:
            for method in args.methods:
                smoke = {"batch": 4, "input-size": 32} if args.smoke else {}
                cmd = _worker_cmd("model", args, model=model, method=method, **smoke)
                rows.append(_run(cmd, {"OMP_NUM_THREADS": str(args.threads)}))
                print(json.dumps(rows[-1]), flush=True)
        payload["models"] = rows
    if args.skip != "scaling":
        cores = args.threads if args.device == "cpu" else 1
        rows = []
        for n in args.nproc:
            for threads in sorted({1, max(1, cores // n)}) if args.device == "cpu" else [1]:
                launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
                batch = 8 if args.smoke else args.scaling_batch
                cmd = launcher + _worker_cmd("scaling", args, method=args.methods[0], batch=batch)[1:]
                rows.append(_run(cmd, {"OMP_NUM_THREADS": str(threads)}))
                print(json.dumps(rows[-1]), flush=True)
        base = next(r for r in rows if r["processes"] == 1 and r["threads_per_process"] == max(1, cores))
        for r in rows:
            r["speedup_vs_1_process_all_cores"] = round(base["ms_median"] / r["ms_median"], 3)
        payload["scaling"] = {"model": "resnet20a_cifar10", "method": args.methods[0], "rows": rows}
    if args.smoke:
        return 0
    suffix = "" if args.device == "cpu" else f"_{args.device.split(':')[0]}"
    print(f"wrote {write_result('distributed_throughput' + suffix, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
