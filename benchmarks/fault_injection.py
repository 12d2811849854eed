"""Fault injection on a real `dfq quantize` process: SIGKILL at random moments, SIGTERM, injected NaN.

1. Run a small AdaDFQ quantization uninterrupted (the reference).
2. Run it again, SIGKILL it at `--kills` seeded random moments, resume after each kill; compare the final
   model with the reference bit for bit and look for half-written files.
3. SIGTERM a run: time until it exits with code 143 and a resumable checkpoint.
4. Inject NaN losses in-process: a transient one is rolled back; a persistent one stops the run cleanly.

Usage: python benchmarks/fault_injection.py [--kills 10] [--seed 1234] [--out FILE]
Writes benchmarks/results/fault_injection.json (or FILE).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PRESET = """\
seed: 11
method:
  name: adadfq
  train: {epochs: 6, iters_per_epoch: 5, batch_size: 4, warmup_epochs: 1, observe_epochs: 1,
          checkpoint_every_iters: 1}
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TOTAL_ITERS = 6 * 5


def _cmd(weights: Path, config: Path, out: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "dfq", "quantize", "resnet20a_cifar10", "--out", str(out), "--no-progress"]
    return [*cmd, "--resume"] if resume else [*cmd, "--weights", str(weights), "--config", str(config)]


def _progress(out: Path) -> int:
    """Iterations saved in the run's checkpoint (0 if none)."""
    try:
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    except (FileNotFoundError, RuntimeError, EOFError):  # not written yet
        return 0
    return ckpt["epoch"] * 5 + ckpt["iteration"]


def kill_and_resume(weights: Path, config: Path, out: Path, kills: int, seed: int) -> list[dict]:
    """SIGKILL the run once it has saved each of ``kills`` seeded random iteration counts (plus a random
    few milliseconds, so the kill lands anywhere in the next iteration or checkpoint write), resuming each time."""
    rng = random.Random(seed)
    targets = sorted(rng.sample(range(1, TOTAL_ITERS), kills))
    events = []
    for target in [*targets, None]:
        resume = (out / "checkpoint.pt").exists()
        proc = subprocess.Popen(
            _cmd(weights, config, out, resume), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        if target is None:
            _, err = proc.communicate(timeout=600)
            if proc.returncode:
                raise RuntimeError(err)
            return events
        while _progress(out) < target and proc.poll() is None:
            time.sleep(0.02)
        jitter = rng.uniform(0.0, 0.3)
        time.sleep(jitter)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        events.append(
            {
                "target_iteration": target,
                "extra_seconds": round(jitter, 3),
                "saved_iterations_after_kill": _progress(out),
                "stale_tmp_files": len(list(out.glob(".*.tmp"))),
            }
        )
    return events


def sigterm_latency(weights: Path, config: Path, out: Path) -> dict:
    cmd = _cmd(weights, config, out, False)
    cmd += ["--set", "method.train.epochs=200"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (out / "checkpoint.pt").exists():
        time.sleep(0.1)
    time.sleep(1.0)
    start = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return {
        "exit_code": proc.returncode,
        "seconds_to_exit": round(time.perf_counter() - start, 2),
        "message": err.strip().splitlines()[-1],
        "checkpoint_saved": (out / "checkpoint.pt").exists(),
    }


def nan_rollbacks() -> dict:
    from dfq.config import resolve_config
    from dfq.errors import DFQError
    from dfq.models import create_model
    from dfq.train import Trainer

    def trainer(calls_with_nan: set[int]) -> Trainer:
        schedule = {"epochs": 3, "iters_per_epoch": 4, "batch_size": 4, "warmup_epochs": 1, "observe_epochs": 1}
        overrides = {"method.name": "adadfq", **{f"method.train.{k}": v for k, v in schedule.items()}}
        config = resolve_config(None, overrides)
        torch.manual_seed(0)
        t = Trainer(config.create_method(), create_model("resnet20a_cifar10"), config.quant, num_classes=10,
                    input_size=(3, 32, 32), seed=config.seed, progress=False)  # fmt: skip
        method, count = t.game.method, {"n": 0}
        original = method.generator_loss

        def loss(out):
            count["n"] += 1
            losses = original(out)
            if count["n"] in calls_with_nan:
                losses["loss"] = losses["loss"] * float("nan")
            return losses

        method.generator_loss = loss
        return t

    transient = trainer({7})
    _, summary = transient.run()
    persistent = trainer(set(range(6, 10_000)))
    try:
        persistent.run()
        stopped = False
    except DFQError:
        stopped = True
    q = transient.game.student
    finite = all(torch.isfinite(t).all() for t in q.state_dict().values() if t.is_floating_point())
    return {
        "transient_nan_rollbacks": summary["rollbacks"],
        "transient_run_finished_finite": bool(finite),
        "persistent_nan_stopped_with_error": stopped,
        "persistent_rollbacks": persistent.rollbacks,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights, config = tmp / "w.pt", tmp / "preset.yaml"
        torch.manual_seed(0)
        from dfq.models import create_model

        torch.save(create_model("resnet20a_cifar10").state_dict(), weights)
        config.write_text(PRESET)
        subprocess.run(_cmd(weights, config, tmp / "ref", False), env=ENV, check=True, capture_output=True)
        events = kill_and_resume(weights, config, tmp / "killed", args.kills, args.seed)
        a = torch.load(tmp / "ref" / "model.pt", weights_only=True)["state_dict"]
        b = torch.load(tmp / "killed" / "model.pt", weights_only=True)["state_dict"]
        result = {
            "kills": len(events),
            "kill_events": events,
            "bit_identical_to_uninterrupted": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
            "stale_tmp_files_at_end": len(list((tmp / "killed").glob(".*.tmp"))),
            "metrics_lines": (tmp / "killed" / "metrics.jsonl").read_text().count("\n"),
            "sigterm": sigterm_latency(weights, config, tmp / "term"),
            "nan": nan_rollbacks(),
        }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        from _common import write_result

        print(f"wrote {write_result('fault_injection', result)}")
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
