"""Provenance for benchmark results: command, git commit, machine, date."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from dfq.data import open_dataset
from dfq.data.loader import make_loader
from dfq.evaluate import evaluate
from dfq.models import create_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED_DATA = ROOT.parent / "shared" / "data"
WEIGHTS = SHARED_DATA / "resnet20-12fca82f.th"  # the pretrained CIFAR-10 ResNet-20 (P)
LOSSLESS = SHARED_DATA / "cifar10-test-4class-lossless.npz"
JPEG = SHARED_DATA / "cifar10-test-jpeg75.npz"
TEST_SETS = {"lossless": LOSSLESS, "jpeg75": JPEG}  # both CIFAR-10 test sets, by the names results use
LITE0 = SHARED_DATA / "efficientnet-lite0-57934424.pth"
IMAGENET = SHARED_DATA / "imagenet-sample1000-224.npz"


def command() -> str:
    """This process's command line, as it was typed."""
    return " ".join([Path(sys.executable).name, *sys.argv])


def provenance() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
            ).stdout.strip()
        )
    except OSError:
        commit, dirty = "unknown", False
    return {
        "command": command(),
        "git_commit": commit + ("-dirty" if dirty else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
    }


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**provenance(), **payload}, indent=2) + "\n")
    return path


def run_cli(args: list[str]) -> dict:
    """Run ``dfq ... --json`` in a subprocess and return its JSON line (the last of stdout)."""
    proc = subprocess.run(
        [sys.executable, "-m", "dfq", *args, "--json", "--no-progress"], cwd=ROOT, capture_output=True, text=True
    )
    if proc.returncode:
        raise RuntimeError(f"dfq {' '.join(args)} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cli_top1(target: list[str], sets: dict[str, Path] = TEST_SETS) -> dict[str, float]:
    """Top-1 of ``dfq eval TARGET`` (a run directory, or a zoo model and its ``--weights``) on each named set."""
    return {name: run_cli(["eval", *target, "--data", str(path)])["top1"] for name, path in sets.items()}


def top1_on(model: torch.nn.Module, sets: dict[str, Path]) -> dict[str, float]:
    """Top-1 of a zoo-derived model (float or quantized) on each named test set, in this process."""
    info = model.dfq_info
    return {name: evaluate(model, make_loader(open_dataset(path), info.mean, info.std), progress=False)["top1"]
            for name, path in sets.items()}  # fmt: skip


def run_models(name: str, keys: list[str], run_model: Callable[[str, Path], dict]) -> None:
    """``run_model(key, scratch_dir)`` for each key, writing ``benchmarks/results/NAME.json`` after each model and
    keeping the entries of models this run does not redo."""
    previous = RESULTS / f"{name}.json"
    models = json.loads(previous.read_text())["models"] if previous.exists() else {}
    for key in keys:
        with tempfile.TemporaryDirectory() as tmp:
            models[key] = run_model(key, Path(tmp))
        print(f"wrote {write_result(name, {'models': models})}", flush=True)


def lite0_photos(batch_size: int) -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """EfficientNet-Lite0 (P, in eval mode) and the 1,000 ImageNet photos through its preprocessing, in batches."""
    p = create_model("efficientnet_lite0", weights=LITE0).eval()
    info = p.dfq_info
    return p, list(make_loader(open_dataset(IMAGENET), info.mean, info.std, batch_size=batch_size))
