"""Checkpoints are validated before any state is touched; out-of-memory gives a clear message; runs reproduce."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dfq import cli
from dfq.checkpoint import load_quantized, save_quantized
from dfq.config import resolve_config
from dfq.errors import DFQError
from dfq.models import create_model
from dfq.quant import quantize_model


def _saved(tmp_path, mutate):
    config = resolve_config(None, {"quant.wbits": 4, "quant.abits": 4})
    q = quantize_model(create_model(config.model), config.quant)
    path = save_quantized(tmp_path / "model.pt", q, config)
    payload = torch.load(path, weights_only=True)
    mutate(payload["state_dict"])
    torch.save(payload, path)
    return path


def test_checkpoint_missing_tensor_is_named(tmp_path):
    path = _saved(tmp_path, lambda sd: sd.pop("layer2.1.conv1.weight"))
    with pytest.raises(DFQError, match=r"missing key\(s\), first 'layer2.1.conv1.weight'"):
        load_quantized(path)


def test_checkpoint_wrong_shape_is_named(tmp_path):
    path = _saved(tmp_path, lambda sd: sd.__setitem__("linear.weight", torch.zeros(3, 64)))
    with pytest.raises(DFQError, match=r"'linear.weight' has shape \(3, 64\), model expects \(10, 64\)"):
        load_quantized(path)


def test_foreign_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(DFQError, match="not a dfq quantized checkpoint"):
        load_quantized(path)


def test_out_of_memory_is_one_clear_line(monkeypatch, capsys, tmp_path):
    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr("dfq.api.run", boom)
    rc = cli.main(["quantize", "resnet20a_cifar10", "--out", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "out of memory" in err[0] and "method.train.batch_size" in err[0]


def test_checkpoint_from_a_newer_dfq_is_refused(tmp_path):
    path = _saved(tmp_path, lambda sd: None)
    payload = torch.load(path, weights_only=True)
    payload["dfq_version"] = "99.0.0"
    torch.save(payload, path)
    with pytest.raises(DFQError, match=r"written by dfq 99.0.0, newer than this dfq"):
        load_quantized(path)


def test_full_disk_is_a_clear_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    import errno
    import os

    from dfq.utils.io import save_json

    target = save_json({"ok": 1}, tmp_path / "summary.json")

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(DFQError, match="No space left on device"):
        save_json({"ok": 2}, target)
    assert target.read_text().strip().endswith("}") and '"ok": 1' in target.read_text()
    assert not list(tmp_path.glob(".*.tmp"))


_SHORT_RUNS = """
import hashlib, torch, dfq
from dfq.methods import AdaDFQConfig, ReconConfig
from dfq.models import create_model
from dfq.train import TrainConfig
torch.set_num_threads(1)  # a fixed thread count (more only slow the small ops of a game down)
h = hashlib.sha256()
for method in (ReconConfig(num_samples=32, synth_batch=32, synth_steps=5, iters=10, batch_size=16),
               AdaDFQConfig(train=TrainConfig(epochs=2, iters_per_epoch=2, batch_size=4, warmup_epochs=1,
                                              observe_epochs=1))):
    torch.manual_seed(0)
    q = dfq.quantize(create_model("resnet20a_cifar10"), dfq.QuantConfig(), method, progress=False).model
    for v in q.state_dict().values():
        h.update(v.contiguous().numpy().tobytes())
print(h.hexdigest())
"""


def test_a_seeded_run_is_bit_identical_in_another_process():
    """Two processes with one seed and MKL pinned (benchmarks/determinism.py) return the same Q (recon and a game),
    whatever Python's hash seed: nothing in a run may depend on set order, an unseeded stream or the process."""
    procs = [
        subprocess.Popen([sys.executable, "-c", _SHORT_RUNS], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "MKL_CBWR": "COMPATIBLE", "PYTHONHASHSEED": str(hash_seed)})
        for hash_seed in (1, 2)
    ]  # fmt: skip
    runs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], runs
    assert runs[0][0] == runs[1][0] and len(runs[0][0].strip()) == 64
