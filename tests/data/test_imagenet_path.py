"""The ImageNet path end to end on the CPU: a zoo ImageNet model, the class-conditional ImageNet generator,
P's BNS loss, the game with a paper preset, and evaluation on an ImageNet-style class-folder validation set
built here. Random weights (nothing is downloaded), 32-pixel inputs and batches of 2 keep each model to seconds;
the slow tests run the 224-pixel command line, on one process and on two.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dfq.config import load_yaml, resolve_config
from dfq.data import make_loader, open_dataset
from dfq.evaluate import evaluate as evaluate_batches
from dfq.generators import ImageNetGenerator
from dfq.models import create_model
from dfq.train import Trainer
from dfq.utils.seed import seed_everything

ROOT = Path(__file__).resolve().parents[2]
SIZE = 32
SCHEDULE = {"method.train.epochs": 2, "method.train.iters_per_epoch": 1, "method.train.batch_size": 2,
            "method.train.warmup_epochs": 1, "method.train.observe_epochs": 1}  # fmt: skip


def class_folders(root: Path, classes: int = 3, per_class: int = 2) -> Path:
    """``root/<wnid>/<image>``: JPEG and PNG images of different sizes and aspect ratios."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (72 + 8 * c, 80 + 24 * i, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"val_{i}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenetv2"])
def test_imagenet_model_end_to_end_on_a_class_folder(name, tmp_path):
    val = open_dataset(class_folders(tmp_path / "val"), image_size=SIZE)
    torch.manual_seed(0)
    model = create_model(name).eval()
    info = model.dfq_info
    seen = []

    def evaluate(q):
        seen.append(1)
        return evaluate_batches(q, make_loader(val, info.mean, info.std, batch_size=4), total=len(val), progress=False)

    preset = load_yaml(ROOT / "configs" / "adadfq" / f"imagenet_{name}_w4a4.yaml")  # the paper's ImageNet settings
    config = resolve_config(preset, {**SCHEDULE, "method.generator.name": "imagenet"})
    seed_everything(config.seed)  # as the entry point does: G's initial weights from the run's seed
    trainer = Trainer(config.create_method(), model, config.quant, num_classes=1000, input_size=(3, SIZE, SIZE),
                      seed=config.seed, run_dir=tmp_path / "run", evaluate=evaluate, progress=False)  # fmt: skip
    assert isinstance(trainer.game.generator, ImageNetGenerator) and trainer.game.method.config.temperature == 5.0
    q, summary = trainer.run()

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_q"] for r in records] == [False, True] and len(seen) == 2
    for r in records:
        assert r["g_bns"] > 0 and all(math.isfinite(r[k]) for k in ("g_loss", "g_bns", "g_h_norm", "top1"))
    assert math.isfinite(records[1]["q_loss"])  # Q trained in the second epoch
    assert 0.0 <= summary["top1"] <= 100.0
    assert q(torch.zeros(1, 3, SIZE, SIZE)).shape == (1, 1000)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_imagenet_command_line_at_224_pixels(nproc, tmp_path):
    """``dfq quantize resnet18 --config configs/adadfq/imagenet_resnet18_w4a4.yaml`` on a class folder."""
    torch.manual_seed(0)
    weights = tmp_path / "resnet18_random.pt"
    torch.save(create_model("resnet18").state_dict(), weights)
    val = class_folders(tmp_path / "val")
    argv = ["quantize", "resnet18", "--config", str(ROOT / "configs/adadfq/imagenet_resnet18_w4a4.yaml")]
    argv += ["--weights", str(weights), "--data", str(val), "--set", "method.train.epochs=1"]
    argv += ["--set", "method.train.iters_per_epoch=1", "--set", "method.train.batch_size=2", "--nproc", str(nproc)]
    argv += ["--out", str(tmp_path / "run"), "--no-progress", "--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "dfq", *argv], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["processes"], summary["n"]) == (nproc, 6) and math.isfinite(summary["top1"])
