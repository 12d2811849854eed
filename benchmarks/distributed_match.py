"""Does a 2-process ``torchrun`` run of AdaDFQ on resnet20a_cifar10 give what one process gives?

Three whole runs of the same configuration (the CPU preset with a shorter schedule, the published weights, seed 0),
all drawing the same global batch (2 noise shards):

- ``torchrun``: ``torchrun --standalone --nproc_per_node 2 -m dfq quantize ...`` (1 thread per process);
- ``single``: ``dfq quantize ... --set method.train.shards=2`` in one process (1 thread);
- ``single_2_threads``: the same with 2 threads, which changes nothing but the order of some float sums.

It records final top-1 on both test sets, each epoch's logged losses and the largest parameter difference of
torchrun and single_2_threads against single. The game amplifies rounding differences (fake quantization rounds,
Adam normalises near-zero gradients), so whole runs drift apart whichever way the sums are reordered; the control
shows how far reordering alone moves them.

Then a **replay** check of the mathematics: two gloo processes run the first iterations of the same configuration
(a shortened schedule so that G-only warm-up, range observation and Q training all occur), saving the state each
iteration starts from; one process redoes each iteration from that state, and the losses, gradients and resulting
parameters are compared.

Usage (on an otherwise idle machine): python benchmarks/distributed_match.py [--epochs 8 --iters-per-epoch 50]
Writes benchmarks/results/distributed_match.json; runs go to runs/distributed_match/.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from _common import JPEG, LOSSLESS, ROOT, WEIGHTS, write_result

PRESET = ROOT / "configs" / "cpu" / "adadfq_resnet20a_cifar10.yaml"
NOISE = ("conv1.bias", "conv2.bias", "bn1.running_mean", "bn2.running_mean")  # of the CIFAR generator


def _config(epochs: int, iters: int, warmup: int, observe: int) -> dict:
    """The CPU preset with this schedule (learning-rate milestones at the same fractions of the run)."""
    config = yaml.safe_load(PRESET.read_text())
    t = config["method"]["train"]
    milestones = [round(m * epochs / t["epochs"]) for m in t["q_milestones"]]
    t.update(epochs=epochs, iters_per_epoch=iters, warmup_epochs=warmup, observe_epochs=observe, eval_every=1)
    t.update(q_milestones=milestones, g_milestones=milestones, shards=2)
    return config


# ------------------------------------------------------------------------------------------ whole runs
def _quantize(name: str, config_file: Path, out: Path, processes: int, threads: int, limit: int | None) -> dict:
    args = ["quantize", "resnet20a_cifar10", "--config", str(config_file), "--weights", str(WEIGHTS)]
    args += ["--data", str(LOSSLESS), "--out", str(out / name), "--overwrite", "--json", "--no-progress"]
    args += ["--limit", str(limit)] if limit else []
    launcher = ["-m", "dfq"]
    if processes > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m", "dfq"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, *launcher, *args], cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    jpeg = _cli(["eval", str(out / name), "--data", str(JPEG), *(["--limit", str(limit)] if limit else [])], env)
    return {
        "command": " ".join([f"OMP_NUM_THREADS={threads}", "python", *launcher, *args]),
        "processes": processes,
        "threads_per_process": threads,
        "top1_lossless": summary["top1"],
        "top1_jpeg75": jpeg["top1"],
        "seconds": summary["seconds"],
    }


def _cli(args: list[str], env: dict[str, str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "dfq", *args, "--json", "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode:
        raise RuntimeError(f"dfq {' '.join(args)} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _compare_runs(run: Path, reference: Path) -> dict:
    """Per epoch, the largest relative difference of a logged loss; the largest difference of Q's state."""
    load = lambda d: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    per_epoch = []
    for a, b in zip(load(run), load(reference), strict=True):
        keys = [k for k in b if k.startswith(("g_", "q_")) and not k.endswith("lr")]
        per_epoch.append(max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-3) for k in keys))
    qa = torch.load(run / "model.pt", weights_only=True)["state_dict"]
    qb = torch.load(reference / "model.pt", weights_only=True)["state_dict"]
    param = max(float((qa[k].float() - qb[k].float()).abs().max()) for k in qb if qb[k].is_floating_point())
    return {"loss_max_rel_diff_per_epoch": [float(f"{x:.3g}") for x in per_epoch], "q_state_max_abs_diff": param}


# -------------------------------------------------------------------------------------------- replay
def _trainer(config: dict, dist=None):
    from dfq.config import resolve_config
    from dfq.models import create_model
    from dfq.train import Trainer

    p = create_model("resnet20a_cifar10", weights=str(WEIGHTS))
    run = resolve_config(config)
    torch.manual_seed(0)  # G's and Q's initial weights, alike on every rank
    return Trainer(run.create_method(), p, run.quant, num_classes=10, input_size=(3, 32, 32), seed=run.seed,
                   progress=False, dist=dist)  # fmt: skip


def _result(trainer, logs: dict) -> dict:
    game = trainer.game
    if trainer.dist.active:  # the global batch's logged values
        logs = dict(zip(logs, trainer.dist.mean(torch.stack([v.float() for v in logs.values()])), strict=True))
    return {
        "logs": {k: float(v) for k, v in logs.items()},
        "grads": {
            f"{n}.{k}": p.grad.clone()
            for n, m in (("G", game.generator), ("Q", game.student))
            for k, p in m.named_parameters()
            if p.grad is not None
        },
        "Q": {k: v.clone() for k, v in game.student.state_dict().items()},
        "G": {k: v.clone() for k, v in game.generator.state_dict().items()},
    }


def _replay_rank(rank: int, port: int, config: dict, out: Path) -> None:
    import torch.distributed as dist

    from dfq.distributed import DistContext

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        trainer, steps = _trainer(config, DistContext.current()), []
        method = trainer.game.method
        iteration = method.iteration

        def recording(game, train_q: bool):  # the method's iteration, wrapped
            before = trainer.snapshot()
            logs = iteration(game, train_q)
            steps.append({"before": before, "train_q": train_q, **_result(trainer, logs)})
            return logs

        method.iteration = recording
        trainer.run()
        if rank == 0:
            torch.save(steps, out / "replay_steps.pt")
    finally:
        dist.destroy_process_group()


def _max_rel(a: dict, b: dict) -> float:
    """Largest difference relative to each tensor's largest magnitude."""
    return max(
        float((a[k].float() - b[k].float()).abs().max() / b[k].float().abs().max().clamp(min=1e-12))
        for k in b
        if b[k].is_floating_point()
    )


def replay(config: dict, out: Path) -> list[dict]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_replay_rank, args=(port, config, out), nprocs=2, start_method="spawn")
    torch.set_num_threads(1)
    rows = []
    for i, step in enumerate(torch.load(out / "replay_steps.pt", weights_only=False)):
        trainer = _trainer(config)
        trainer.restore(step["before"])
        ref = _result(trainer, trainer.game.iteration(step["train_q"]))
        logs = max(abs(step["logs"][k] - v) / max(abs(v), 1e-3) for k, v in ref["logs"].items())
        # Without the biases just before a training-mode BatchNorm (and that BatchNorm's running mean): their
        # gradient is 0 in exact arithmetic, so what is computed is rounding, which Adam turns into steps of up
        # to lr in any direction.
        grads = {k: v for k, v in ref["grads"].items() if k.removeprefix("G.") not in NOISE}
        g_state = {k: v for k, v in ref["G"].items() if k not in NOISE}
        rows.append(
            {
                "iteration": i,
                "train_q": step["train_q"],
                "loss_max_rel_diff": float(f"{logs:.3g}"),
                "grad_max_rel_diff": float(f"{_max_rel(step['grads'], grads):.3g}"),
                "q_state_max_rel_diff": float(f"{_max_rel(step['Q'], ref['Q']):.3g}"),
                "g_state_max_rel_diff": float(f"{_max_rel(step['G'], g_state):.3g}"),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--iters-per-epoch", type=int, default=50)
    parser.add_argument("--warmup-epochs", type=int, default=2)
    parser.add_argument("--observe-epochs", type=int, default=2)
    parser.add_argument("--replay-epochs", type=int, default=3, help="replay: epochs of --replay-iters (warm-up 1)")
    parser.add_argument("--replay-iters", type=int, default=4)
    parser.add_argument("--limit", type=int, help="evaluate on the first N test images only (a quick check)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "distributed_match")
    parser.add_argument("--no-write", action="store_true", help="print only (a check of the script)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    config = _config(args.epochs, args.iters_per_epoch, args.warmup_epochs, args.observe_epochs)
    config_file = args.out / "config.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    runs = {
        "torchrun": _quantize("torchrun", config_file, args.out, processes=2, threads=1, limit=args.limit),
        "single": _quantize("single", config_file, args.out, processes=1, threads=1, limit=args.limit),
        "single_2_threads": _quantize(
            "single_2_threads", config_file, args.out, processes=1, threads=2, limit=args.limit
        ),
    }
    for name in ("torchrun", "single_2_threads"):
        runs[name]["against_single"] = _compare_runs(args.out / name, args.out / "single")
        print(name, json.dumps(runs[name]), flush=True)
    replay_config = _config(args.replay_epochs, args.replay_iters, warmup=1, observe=2)
    payload = {
        "config": config,
        "runs": runs,
        "replay": {"config": replay_config["train"], "iterations": replay(replay_config, args.out)},
    }
    if not args.no_write:
        print(f"wrote {write_result('distributed_match', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
