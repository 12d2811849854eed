"""``dfq quantize`` under a budget and ``dfq sweep``: files, reloads, the printed table and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dfq.checkpoint import load_quantized
from dfq.cli import main
from dfq.mixed import bits_of, model_tensors

MODEL = "resnet20a_cifar10"
TINY = ["--set", "method.synth_steps=1", "--set", "method.num_samples=4", "--set", "method.iters=1", "--no-progress",
        "--set", "mixed.num_samples=4", "--set", "mixed.synth_steps=1", "--set", "mixed.wbits=[2,4,8]",
        "--set", "mixed.abits=[4,8]"]  # fmt: skip


@pytest.fixture
def data(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, images=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), labels=np.arange(8) % 10)
    return path


def test_quantize_under_a_budget(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, random_weights: Path, data: Path
) -> None:
    run = tmp_path / "run"
    rc = main(["quantize", MODEL, "--weights", str(random_weights), "--out", str(run), "--size-budget", "W4A4",
               "--bops-budget", "0.5G", "--json", *TINY])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "layer3.2.conv2" in out and "GBOPs (budget 0.5)" in out  # the table and the costs
    assert "searched: weights at 2/4/8 bits, activations at 4/8 bits" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["bops"] <= 0.5e9 and summary["mixed"] is True
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["mixed"]["size"] == "W4A4" and config["mixed"]["bops"] == "0.5G"
    allocation = json.loads((run / "allocation.json").read_text())
    assert len(config["quant"]["overrides"]) == len({k.rsplit(":", 1)[0] for k in allocation["bits"]})
    q, _ = load_quantized(run / "model.pt")  # rebuilt from config.yaml's overrides
    assert bits_of(q, model_tensors(q, torch.zeros(1, 3, 32, 32))) == allocation["bits"]
    rc = main(["eval", str(run), "--data", str(data), "--json", "--no-progress"])
    assert rc == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mixed"] is True


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--size-budget", "1KB"], "no bit allocation fits"),
        (["--size-budget", "lots"], "size budget looks like"),
        (["--bops-budget", "W9A4"], "from 2 to 8"),
        (["--size-budget", "W4A4", "--protocol", "paper"], "needs the deploy protocol"),
    ],
)
def test_budget_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, random_weights: Path, flags: list[str], fragment: str
) -> None:
    rc = main(["quantize", MODEL, "--weights", str(random_weights), "--out", str(tmp_path / "run"), *flags, *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert "Traceback" not in err


def test_recon_searches_only_the_activation_bits_of_a_uniform_size_budget(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, random_weights: Path
) -> None:
    at = TINY.index("mixed.wbits=[2,4,8]")
    tiny = TINY[: at - 1] + TINY[at + 1 :]  # mixed.wbits left open
    rc = main(["quantize", MODEL, "--weights", str(random_weights), "--out", str(tmp_path / "run"), "--size-budget",
               "W3A4", "--bops-budget", "W3A4", *tiny])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "searched: weights at 3 bits, activations at 4/8 bits" in out
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["mixed"]["wbits"] == [3]
    bits = json.loads((tmp_path / "run" / "allocation.json").read_text())["bits"]
    assert {b for name, b in bits.items() if name.endswith(":w")} == {3}


def test_sweep_runs_its_points_and_reports_them(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, random_weights: Path, data: Path
) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "sweep"
    argv = ["sweep", MODEL, "--weights", str(random_weights), "--uniform", "W8A8,W4A4", "--mixed", "W4A4",
            "--data", str(data), "--out", str(out), "--json", *TINY]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["run"] for r in report["rows"]] == ["uniform-w8a8", "uniform-w4a4", "mixed-w4a4"]
    assert (out / "report" / "pareto.png").is_file()
    rows = {r["run"]: r for r in report["rows"]}
    assert rows["mixed-w4a4"]["weight_bytes"] <= rows["uniform-w4a4"]["weight_bytes"]
    assert rows["mixed-w4a4"]["bops"] <= rows["uniform-w4a4"]["bops"]
    assert rows["uniform-w8a8"]["weight_bytes"] == 2 * rows["uniform-w4a4"]["weight_bytes"]
    assert main(argv) == 0  # an interrupted or finished sweep keeps its finished points
    assert capsys.readouterr().out.count("finished earlier, kept") == 3
