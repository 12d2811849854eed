"""The command line: JSON output, run directories, config precedence, and one-line user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import CIFAR10_4CLASS, RESNET20_WEIGHTS, require_shared

from dfq.checkpoint import load_quantized
from dfq.cli import main
from dfq.models import create_model
from dfq.quant import QuantActivation, QuantLinear, act_quantizers

MODEL = "resnet20a_cifar10"
TINY = ["--set", "method.synth_steps=2", "--set", "method.num_samples=4", "--set", "method.iters=2", "--no-progress"]
TINY_ZEROQ = ["--set", "method.steps=2", "--set", "method.num_samples=4", "--no-progress"]


def _npz(path: Path, n: int = 8, size: int = 32, max_label: int = 9) -> Path:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = np.arange(n) % (max_label + 1)
    labels[-1] = max_label
    np.savez(path, images=images, labels=labels)
    return path


@pytest.fixture
def small_npz(tmp_path: Path) -> Path:
    return _npz(tmp_path / "small.npz")


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _last_json(out: str) -> dict:
    payload = json.loads(out.strip().splitlines()[-1])
    assert isinstance(payload, dict)
    return payload


def _assert_user_error(rc: int, err: str, *fragments: str) -> str:
    """Exit code 2, exactly one stderr line starting with 'dfq: error:', no traceback."""
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dfq: error:"), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _subprocess(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dfq", *argv], capture_output=True, text=True, env=env, timeout=120, check=False
    )


# --------------------------------------------------------------------------- models


def test_models_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, "models", "--json")
    assert rc == 0, err
    rows = {r["name"]: r for r in _last_json(out)["models"]}
    assert rows[MODEL]["num_classes"] == 10
    assert rows[MODEL]["dataset"] == "cifar10"
    assert any(line.startswith(MODEL) for line in out.splitlines()[:-1])  # the human-readable table


def test_models_pattern_filters(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "models", "resnet20a*", "--json")
    assert rc == 0
    assert [r["name"] for r in _last_json(out)["models"]] == [MODEL]


def test_subprocess_models_json() -> None:
    proc = _subprocess("models", "--json")
    assert proc.returncode == 0, proc.stderr
    names = [r["name"] for r in json.loads(proc.stdout.strip().splitlines()[-1])["models"]]
    assert MODEL in names
    assert "Traceback" not in proc.stderr


def test_subprocess_user_error_is_one_line() -> None:
    proc = _subprocess("eval", "resnet20a_cifar1", "--data", "nowhere.npz")
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("dfq: error: unknown model 'resnet20a_cifar1'")
    assert "did you mean 'resnet20a_cifar10'" in lines[0]
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- eval / quantize on real data


def test_eval_float_model_on_real_data(capsys: pytest.CaptureFixture[str]) -> None:
    require_shared(RESNET20_WEIGHTS, CIFAR10_4CLASS)
    rc, out, err = _run(
        capsys,
        "eval", MODEL, "--weights", str(RESNET20_WEIGHTS), "--data", str(CIFAR10_4CLASS),
        "--limit", "200", "--json", "--no-progress",
    )  # fmt: skip
    assert rc == 0, err
    payload = _last_json(out)
    assert {"top1", "top5", "n", "model", "wbits", "abits"} <= payload.keys()
    assert payload["n"] == 200
    assert payload["model"] == MODEL
    assert (payload["wbits"], payload["abits"]) == (32, 32)
    assert 80.0 < payload["top1"] <= payload["top5"] <= 100.0


def test_quantize_writes_run_dir_and_eval_reproduces_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    require_shared(RESNET20_WEIGHTS, CIFAR10_4CLASS)
    run_dir = tmp_path / "run"
    rc, out, err = _run(
        capsys,
        "quantize", MODEL, "--method", "zeroq", "--wbits", "8", "--abits", "8",
        "--weights", str(RESNET20_WEIGHTS), "--data", str(CIFAR10_4CLASS), "--limit", "200",
        "--out", str(run_dir), "--json", *TINY_ZEROQ,
    )  # fmt: skip
    assert rc == 0, err
    summary = _last_json(out)
    assert {"top1", "fp_top1", "method", "wbits", "abits", "seconds", "n"} <= summary.keys()
    assert (summary["method"], summary["wbits"], summary["abits"], summary["n"]) == ("zeroq", 8, 8, 200)
    assert summary["seconds"] >= 0
    assert abs(summary["fp_top1"] - summary["top1"]) < 5  # W8A8 is close to float

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"] == MODEL
    assert config["quant"]["wbits"] == 8 and config["quant"]["abits"] == 8
    assert config["method"] == {"name": "zeroq", "steps": 2, "num_samples": 4, "lr": 0.5, "calib_batch_size": 0}
    assert (run_dir / "model.pt").is_file()
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["top1"] == summary["top1"] and saved["fp_top1"] == summary["fp_top1"]

    rc, out, err = _run(
        capsys, "eval", str(run_dir), "--data", str(CIFAR10_4CLASS), "--limit", "200", "--json", "--no-progress"
    )
    assert rc == 0, err
    again = _last_json(out)
    assert again["top1"] == summary["top1"]
    assert again["top5"] == summary["top5"]
    assert (again["n"], again["wbits"], again["abits"], again["model"]) == (200, 8, 8, MODEL)


def test_default_method_is_recon_and_its_flags_reach_the_config(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, random_weights: Path
) -> None:
    run_dir = tmp_path / "run"
    rc, out, err = _run(
        capsys, "quantize", MODEL, "--weights", str(random_weights), "--out", str(run_dir), "--json", *TINY
    )
    assert rc == 0, err
    summary = _last_json(out)
    assert (summary["method"], summary["wbits"], summary["abits"]) == ("recon", 4, 4)
    assert {"synthesize_s", "reconstruct_s"} <= summary.keys()
    assert summary["seconds"] >= summary["synthesize_s"] + summary["reconstruct_s"] - 2e-3  # each rounded to 1 ms
    recon = yaml.safe_load((run_dir / "config.yaml").read_text())["method"]
    assert recon["name"] == "recon"
    assert (recon["synth_steps"], recon["iters"], recon["num_samples"]) == (2, 2, 4)


# --------------------------------------------------------------------------- config precedence and overrides


def test_config_preset_with_cli_precedence(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, random_weights: Path
) -> None:
    preset = tmp_path / "preset.yaml"
    preset.write_text(
        yaml.safe_dump(
            {"method": {"name": "zeroq", "steps": 3, "num_samples": 2}, "quant": {"wbits": 6, "abits": 7}, "seed": 5}
        )
    )
    run_dir = tmp_path / "run"
    rc, out, err = _run(
        capsys,
        "quantize", MODEL, "--config", str(preset), "--wbits", "5", "--weights", str(random_weights),
        "--out", str(run_dir), "--json", "--no-progress",
    )  # fmt: skip
    assert rc == 0, err
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["quant"]["wbits"] == 5  # the command line wins
    assert config["quant"]["abits"] == 7  # the preset fills what the command line leaves out
    assert config["method"]["steps"] == 3
    assert config["method"]["num_samples"] == 2
    assert config["seed"] == 5
    summary = _last_json(out)
    assert (summary["wbits"], summary["abits"]) == (5, 7)
    assert "top1" not in summary  # no --data, no accuracy


def test_overrides_reach_config_and_reloaded_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, random_weights: Path
) -> None:
    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml.safe_dump({"quant": {"overrides": {"layer1.0.conv1": {"wbits": 6}}}}))
    run_dir = tmp_path / "run"
    rc, _, err = _run(
        capsys,
        "quantize", MODEL, "--config", str(preset), "--wbits", "4", "--abits", "4", "--protocol", "paper",
        "--weights", str(random_weights), "--out", str(run_dir),
        "--override", "conv1=W8", "--override", "linear=W8A8", "--override", "layer3.2.relu2=A6",
        *TINY,
    )  # fmt: skip
    assert rc == 0, err
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["quant"]["overrides"] == {
        "layer1.0.conv1": {"wbits": 6, "abits": None},  # the preset's overrides are kept
        "conv1": {"wbits": 8, "abits": None},
        "linear": {"wbits": 8, "abits": 8},
        "layer3.2.relu2": {"wbits": None, "abits": 6},
    }

    model, run_config = load_quantized(run_dir)
    assert run_config.quant.overrides["linear"].abits == 8
    assert model.conv1.weight_quantizer.spec.bits == 8
    assert isinstance(model.linear, QuantLinear)
    assert model.linear.weight_quantizer.spec.bits == 8
    assert model.layer1[0].conv1.weight_quantizer.spec.bits == 6
    assert model.layer1[0].conv2.weight_quantizer.spec.bits == 4
    assert model.layer3[2].conv2.weight_quantizer.spec.bits == 4
    assert isinstance(model.layer3[2].relu2, QuantActivation)
    act_bits = {name: q.spec.bits for name, q in act_quantizers(model)}
    assert act_bits.pop("layer3.2.relu2.act_quantizer") == 6
    assert set(act_bits.values()) == {4}


def test_ends_bits_flag_reaches_config_and_reloaded_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, random_weights: Path
) -> None:
    run_dir = tmp_path / "run"
    rc, _, err = _run(
        capsys,
        "quantize", MODEL, "--wbits", "3", "--abits", "3", "--ends-bits", "8", "--weights", str(random_weights),
        "--out", str(run_dir), *TINY,
    )  # fmt: skip
    assert rc == 0, err
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["quant"]["ends_bits"] == 8
    model, _ = load_quantized(run_dir)
    assert model.conv1.weight_quantizer.spec.bits == model.linear.weight_quantizer.spec.bits == 8
    assert model.relu.act_quantizer.spec.bits == model.layer3[2].relu2.act_quantizer.spec.bits == 8
    assert model.layer1[0].conv1.weight_quantizer.spec.bits == model.layer3[2].relu1.act_quantizer.spec.bits == 3


# --------------------------------------------------------------------------- user errors


def test_unknown_model_suggests_a_name(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, _, err = _run(capsys, "quantize", "resnet20a_cifar1", "--out", str(tmp_path / "run"), "--no-progress")
    _assert_user_error(rc, err, "unknown model 'resnet20a_cifar1'", "did you mean 'resnet20a_cifar10'")
    assert not (tmp_path / "run").exists()


def test_unknown_method(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, _, err = _run(capsys, "quantize", MODEL, "--method", "zerq", "--out", str(tmp_path / "run"))
    _assert_user_error(rc, err, "unknown method 'zerq'", "did you mean 'zeroq'")


@pytest.mark.parametrize("bits", ["9", "1"])
def test_bad_bit_width(capsys: pytest.CaptureFixture[str], tmp_path: Path, bits: str) -> None:
    rc, _, err = _run(capsys, "quantize", MODEL, "--wbits", bits, "--out", str(tmp_path / "run"))
    _assert_user_error(rc, err, "wbits", f"got {bits}")
    assert not (tmp_path / "run").exists()


def test_non_integer_bit_width_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["quantize", MODEL, "--wbits", "eight", "--out", str(tmp_path / "run")])
    _assert_user_error(exc.value.code, capsys.readouterr().err, "--wbits")


def test_missing_weights_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "nope.th"
    rc, _, err = _run(capsys, "quantize", MODEL, "--weights", str(missing), "--out", str(tmp_path / "run"))
    _assert_user_error(rc, err, "weights file not found", str(missing))
    rc, _, err = _run(capsys, "eval", MODEL, "--weights", str(missing), "--data", str(tmp_path))
    _assert_user_error(rc, err, "weights file not found")


def test_weights_of_another_architecture(capsys: pytest.CaptureFixture[str], tmp_path: Path, small_npz: Path) -> None:
    other = tmp_path / "resnet20_cifar10.pt"
    torch.save(create_model("resnet20_cifar10").state_dict(), other)
    rc, _, err = _run(capsys, "eval", MODEL, "--weights", str(other), "--data", str(small_npz), "--no-progress")
    _assert_user_error(rc, err, "does not match model 'resnet20a_cifar10'")
    rc, _, err = _run(capsys, "quantize", MODEL, "--weights", str(other), "--out", str(tmp_path / "run"), *TINY)
    _assert_user_error(rc, err, "does not match model 'resnet20a_cifar10'")
    assert not (tmp_path / "run" / "model.pt").exists()


def test_corrupt_weights_file(capsys: pytest.CaptureFixture[str], tmp_path: Path, small_npz: Path) -> None:
    corrupt = tmp_path / "corrupt.th"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    rc, _, err = _run(capsys, "eval", MODEL, "--weights", str(corrupt), "--data", str(small_npz), "--no-progress")
    _assert_user_error(rc, err, "cannot read weights file", str(corrupt))


def test_missing_data_path(capsys: pytest.CaptureFixture[str], tmp_path: Path, random_weights: Path) -> None:
    missing = tmp_path / "nope.npz"
    rc, _, err = _run(capsys, "eval", MODEL, "--weights", str(random_weights), "--data", str(missing))
    _assert_user_error(rc, err, str(missing), "no such file")
    # quantize checks the data before doing any work
    run_dir = tmp_path / "run"
    rc, _, err = _run(
        capsys, "quantize", MODEL, "--weights", str(random_weights), "--data", str(missing), "--out", str(run_dir)
    )
    _assert_user_error(rc, err, "no such file")
    assert not run_dir.exists()


def test_truncated_npz(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, small_npz: Path, random_weights: Path
) -> None:
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(small_npz.read_bytes()[:1000])
    rc, _, err = _run(capsys, "eval", MODEL, "--weights", str(random_weights), "--data", str(truncated))
    _assert_user_error(rc, err, str(truncated), "truncated or corrupt")


def test_data_with_more_classes_than_the_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, random_weights: Path
) -> None:
    data = _npz(tmp_path / "hundred.npz", max_label=99)
    rc, _, err = _run(capsys, "eval", MODEL, "--weights", str(random_weights), "--data", str(data))
    _assert_user_error(rc, err, "100 classes", "predicts 10")


def test_wrong_image_shape(capsys: pytest.CaptureFixture[str], tmp_path: Path, random_weights: Path) -> None:
    data = _npz(tmp_path / "big.npz", size=64)
    rc, _, err = _run(capsys, "eval", MODEL, "--weights", str(random_weights), "--data", str(data))
    _assert_user_error(rc, err, "(64, 64)", "(32, 32)")


def test_unknown_config_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    preset = tmp_path / "preset.yaml"
    preset.write_text("quant: {wbitz: 4}\n")
    rc, _, err = _run(capsys, "quantize", MODEL, "--config", str(preset), "--out", str(tmp_path / "run"))
    _assert_user_error(rc, err, "unknown config key 'quant.wbitz'", "did you mean 'wbits'")


def test_malformed_override(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for bad in ("conv1=X8", "conv1", "conv1=", "=W8"):
        rc, _, err = _run(capsys, "quantize", MODEL, "--override", bad, "--out", str(tmp_path / "run"))
        _assert_user_error(rc, err, "--override", bad)
    rc, _, err = _run(capsys, "quantize", MODEL, "--override", "conv1=W9", "--out", str(tmp_path / "run"))
    _assert_user_error(rc, err, "wbits", "got 9")


def test_existing_run_dir_is_not_overwritten(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, random_weights: Path
) -> None:
    run_dir = tmp_path / "run"
    base = ["quantize", MODEL, "--weights", str(random_weights), "--out", str(run_dir), *TINY]
    rc, _, err = _run(capsys, *base, "--wbits", "8")
    assert rc == 0, err
    files = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    assert {"config.yaml", "model.pt", "summary.json"} <= files.keys()

    rc, _, err = _run(capsys, *base, "--wbits", "4")
    _assert_user_error(rc, err, "already holds a run", "--overwrite")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == files  # nothing lost or changed

    rc, _, err = _run(capsys, *base, "--wbits", "4", "--overwrite")
    assert rc == 0, err
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["quant"]["wbits"] == 4
    assert load_quantized(run_dir)[1].quant.wbits == 4


def test_unwritable_output_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path, random_weights: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user (root?) can write to a read-only directory")
        rc, _, err = _run(
            capsys, "quantize", MODEL, "--weights", str(random_weights), "--out", str(locked / "run"), *TINY
        )
        _assert_user_error(rc, err, "cannot write", str(locked))
    finally:
        locked.chmod(0o755)


def test_output_dir_below_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path, random_weights: Path) -> None:
    """The same error path as an unwritable directory, testable as root."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    rc, _, err = _run(capsys, "quantize", MODEL, "--weights", str(random_weights), "--out", str(blocker / "run"), *TINY)
    _assert_user_error(rc, err, "cannot write", str(blocker))
    assert blocker.read_text() == "not a directory"


def test_debug_shows_the_traceback(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, _, err = _run(capsys, "eval", "resnet20a_cifar1", "--data", str(tmp_path), "--debug")
    assert rc == 2
    assert "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("dfq: error: unknown model")


def test_override_with_an_empty_quant_section_in_the_preset(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, random_weights: Path
) -> None:
    preset = tmp_path / "preset.yaml"
    preset.write_text("quant:\n")  # every key commented out: YAML reads None
    rc, _, err = _run(
        capsys, "quantize", MODEL, "--config", str(preset), "--override", "conv1=W8",
        "--weights", str(random_weights), "--out", str(tmp_path / "run"), *TINY,
    )  # fmt: skip
    assert rc == 0, err


def test_failed_overwrite_keeps_the_previous_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, random_weights: Path
) -> None:
    run_dir = tmp_path / "run"
    base = ["quantize", MODEL, "--out", str(run_dir), *TINY]
    rc, _, err = _run(capsys, *base, "--weights", str(random_weights))
    assert rc == 0, err
    files = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    other = tmp_path / "resnet20_cifar10.pt"
    torch.save(create_model("resnet20_cifar10").state_dict(), other)
    rc, _, err = _run(capsys, *base, "--weights", str(other), "--overwrite", "--wbits", "8")
    _assert_user_error(rc, err, "does not match model")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == files


def test_an_empty_preset_section_keeps_the_method_defaults(tmp_path: Path) -> None:
    from dfq.config import load_yaml, resolve_config

    preset = tmp_path / "preset.yaml"
    preset.write_text("method: recon\nquant:\n")
    assert resolve_config(load_yaml(preset)).quant.weight_scales == "stored"  # recon's own requirement survives
