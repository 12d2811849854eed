"""Bad inputs on the command line: each is one line on stderr, exit code 2, no traceback.

These are the rows of the "Bad inputs" table in docs/reliability.md that tests/cli/test_cli.py and
tests/cli/test_reliability.py do not already cover. Every case runs ``dfq.cli.main`` in-process and
fails before any quantization work, so the file is fast.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from data_files import Exploit, cifar10_python_files, random_cifar

from dfq.checkpoint import save_quantized
from dfq.cli import main
from dfq.config import resolve_config
from dfq.hub import dfq_home
from dfq.models import create_model, get_model_info
from dfq.quant import quantize_model

MODEL = "resnet20a_cifar10"


@pytest.fixture(scope="module")
def weights(random_weights: Path) -> Path:
    """A valid state dict of a randomly initialised resnet20a_cifar10 (the shared fixture)."""
    return random_weights


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid 32×32 test set with 4 images."""
    path = tmp_path_factory.mktemp("data") / "ok.npz"
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), labels=np.arange(4))
    return path


def user_error(capsys: pytest.CaptureFixture[str], *argv: object) -> str:
    """Run the CLI; assert exit code 2, one stderr line starting with 'dfq: error:', no traceback."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dfq: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _preset(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "preset.yaml"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- configuration


def test_config_key_of_the_wrong_type(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    preset = _preset(tmp_path, "quant: {wbits: four}\n")
    line = user_error(capsys, "quantize", MODEL, "--config", preset, "--out", tmp_path / "run")
    assert "config key 'quant.wbits' has the wrong type: got 'four'" in line


def test_yaml_that_is_not_a_mapping(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    preset = _preset(tmp_path, "- 1\n- 2\n")
    line = user_error(capsys, "quantize", MODEL, "--config", preset, "--out", tmp_path / "run")
    assert line.endswith("preset.yaml must hold a mapping at the top level")


def test_invalid_yaml_is_reported_on_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    preset = _preset(tmp_path, "quant: {wbits: 4\n")
    line = user_error(capsys, "quantize", MODEL, "--config", preset, "--out", tmp_path / "run")
    assert "is not valid YAML: expected ',' or '}', but got '<stream end>' (line 2, column 1)" in line


def test_yaml_python_tag_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    preset = _preset(tmp_path, f"!!python/object/apply:os.system ['touch {marker}']\n")
    line = user_error(capsys, "quantize", MODEL, "--config", preset, "--out", tmp_path / "run")
    assert "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'" in line
    assert not marker.exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [("seed: 2001-13-01\n", "month must be in 1..12"), ("seed: !!int abc\n", "invalid literal for int()")],
)
def test_yaml_values_that_pyyaml_cannot_build(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, message: str
) -> None:
    preset = _preset(tmp_path, text)
    line = user_error(capsys, "quantize", MODEL, "--config", preset, "--out", tmp_path / "run")
    assert "is not valid YAML: " + message in line


def test_yaml_with_a_non_string_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    preset = _preset(tmp_path, "1: 2\n")
    line = user_error(capsys, "quantize", MODEL, "--config", preset, "--out", tmp_path / "run")
    assert line == "dfq: error: unknown config key '1'"


def test_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = user_error(capsys, "quantize", MODEL, "--config", tmp_path / "nope.yaml", "--out", tmp_path / "run")
    assert line == f"dfq: error: config file not found: {tmp_path / 'nope.yaml'}"


@pytest.mark.parametrize(
    ("method", "setting", "message"),
    [
        ("gdfq", "method.train.epochs=-1", "train.epochs must be >= 1, got -1"),
        ("gdfq", "method.train.batch_size=0", "train.batch_size must be >= 1, got 0"),
        ("zeroq", "method.steps=0", "zeroq.steps must be >= 1, got 0"),
        ("recon", "method.iters=0", "recon.iters must be >= 1, got 0"),
        ("recon", "method.itres=5", "unknown config key 'method.itres' (did you mean 'iters'?)"),
        ("zeroq", "method.train.epochs=2", "unknown config key 'method.train'"),
        ("gdfq", "quant.wbits=nine", "config key 'quant.wbits' has the wrong type: got 'nine', expected int"),
        ("gdfq", "epochs", "--set must look like KEY=VALUE (e.g. method.train.epochs=10), got 'epochs'"),
    ],
)
def test_out_of_range_schedule(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, method: str, setting: str, message: str
) -> None:
    line = user_error(capsys, "quantize", MODEL, "--method", method, "--set", setting, "--out", tmp_path / "run")
    assert line == f"dfq: error: {message}"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train: {q_lr: -1.0}\n", "train.q_lr must be >= 0, got -1.0"),
        ("train: {g_betas: [2.0, 0.5]}\n", "train.g_betas must be two values in [0, 1), got [2.0, 0.5]"),
        ("train: {q_momentum: 0}\n", "train.q_nesterov needs train.q_momentum > 0"),
        ("train: {lr_gamma: -0.1}\n", "train.lr_gamma must be > 0, got -0.1"),
        ("gdfq: {temperature: 0}\n", "gdfq.temperature must be > 0, got 0.0"),
        ("generator: {latent_dim: -5}\n", "generator.latent_dim must be >= 1, got -5"),
        ("gdfq: {kd_reduction: sum}\n", "gdfq.kd_reduction must be 'mean' or 'batchmean', got 'sum'"),
        ("method: {name: gdfq, train: {epochs: 0}}\n", "train.epochs must be >= 1, got 0"),
        ("zeroq: {calib_batch_size: -1}\n", "config section 'zeroq' does not apply to method 'gdfq'"),
    ],
)
def test_settings_the_optimizers_or_models_would_reject_mid_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, weights: Path, text: str, message: str
) -> None:
    preset = _preset(tmp_path, text)
    argv = ["quantize", MODEL, "--method", "gdfq", "--config", preset, "--weights", weights, "--out", tmp_path / "run"]
    assert user_error(capsys, *argv) == f"dfq: error: {message}"
    assert not (tmp_path / "run").exists()


def test_seed_beyond_64_bits(capsys: pytest.CaptureFixture[str], tmp_path: Path, weights: Path) -> None:
    run = tmp_path / "run"
    line = user_error(capsys, "quantize", MODEL, "--seed", 10**20, "--weights", weights, "--out", run)
    assert line == f"dfq: error: seed must be a 64-bit signed integer, got {10**20}"
    assert not run.exists()  # it used to fail after writing config.yaml


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--protocol", "fast"], "argument --protocol: invalid choice: 'fast'"),
        ([], "the following arguments are required: --out"),
    ],
)
def test_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    line = user_error(capsys, "quantize", MODEL, *argv)
    assert message in line and line.endswith("(see `dfq quantize --help`)")


# --------------------------------------------------------------------------- weights files


@pytest.mark.parametrize(
    ("content", "exception"), [(b"", "EOFError"), (None, "RuntimeError")], ids=["empty", "truncated"]
)
def test_empty_or_truncated_weights(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, weights: Path, data: Path, content: bytes | None, exception: str
) -> None:
    bad = tmp_path / "bad.th"
    bad.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2] if content is None else content)
    line = user_error(capsys, "eval", MODEL, "--weights", bad, "--data", data)
    assert line == f"dfq: error: cannot read weights file {bad}: not a PyTorch checkpoint or corrupt ({exception})"


def test_weights_pickle_that_runs_code_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, data: Path
) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.th"
    torch.save({"conv1.weight": Exploit(marker)}, evil)
    line = user_error(capsys, "eval", MODEL, "--weights", evil, "--data", data)
    assert line.endswith("not a PyTorch checkpoint or corrupt (UnpicklingError)")
    assert not marker.exists()


def test_tampered_cached_download(capsys: pytest.CaptureFixture[str], data: Path) -> None:
    remote = next(iter(get_model_info(MODEL).weights.values())).remote
    cached = dfq_home() / "weights" / remote.filename  # DFQ_HOME is a temporary folder (conftest)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"tampered")
    line = user_error(capsys, "eval", MODEL, "--data", data, "--no-progress")
    assert f"{cached}: sha256 is" in line and "(delete it to download again)" in line
    assert cached.read_bytes() == b"tampered"  # reported, never silently replaced


# --------------------------------------------------------------------------- data


def test_empty_npz(capsys: pytest.CaptureFixture[str], tmp_path: Path, weights: Path) -> None:
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    assert (
        user_error(capsys, "eval", MODEL, "--weights", weights, "--data", empty)
        == f"dfq: error: {empty}: file is empty"
    )


def test_npz_with_channels_first_images(capsys: pytest.CaptureFixture[str], tmp_path: Path, weights: Path) -> None:
    path = tmp_path / "chw.npz"
    np.savez(path, images=np.zeros((2, 3, 32, 32), np.uint8), labels=np.arange(2))
    line = user_error(capsys, "eval", MODEL, "--weights", weights, "--data", path)
    assert line.endswith("'images' is a uint8 array of shape 2×3×32×32, expected uint8 N×H×W×3 (RGB)")


def test_npz_with_negative_labels(capsys: pytest.CaptureFixture[str], tmp_path: Path, weights: Path) -> None:
    path = tmp_path / "neg.npz"
    np.savez(path, images=np.zeros((2, 32, 32, 3), np.uint8), labels=np.array([0, -1]))
    line = user_error(capsys, "eval", MODEL, "--weights", weights, "--data", path)
    assert line == f"dfq: error: {path}: labels range over [-1, 0], expected [0, 0]"


def test_malicious_cifar_pickle_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path, weights: Path) -> None:
    marker = tmp_path / "pwned"
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        payload = pickle.dumps(Exploit(marker), protocol=2)
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    line = user_error(capsys, "eval", MODEL, "--weights", weights, "--data", archive)
    assert "cifar-10-batches-py/test_batch: refusing to unpickle 'posix.system'" in line
    assert not marker.exists()


def test_truncated_cifar_archive(capsys: pytest.CaptureFixture[str], tmp_path: Path, weights: Path) -> None:
    images, labels = random_cifar(20, 10)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in cifar10_python_files(images, labels).items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    line = user_error(capsys, "eval", MODEL, "--weights", weights, "--data", archive)
    assert line.startswith(f"dfq: error: {archive}: not a readable tar archive, truncated or corrupt (")


def test_truncated_cifar_binary(capsys: pytest.CaptureFixture[str], tmp_path: Path, weights: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    (folder / "test_batch.bin").write_bytes(bytes(3073 * 2 - 100))
    line = user_error(capsys, "eval", MODEL, "--weights", weights, "--data", folder)
    expected = "6046 bytes is not a whole number of 3073-byte records (truncated, or not a CIFAR-10 binary file)"
    assert line == f"dfq: error: {folder / 'test_batch.bin'}: {expected}"


def test_unrecognised_data_file(capsys: pytest.CaptureFixture[str], tmp_path: Path, weights: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    line = user_error(capsys, "eval", MODEL, "--weights", weights, "--data", notes)
    assert line.startswith(f"dfq: error: cannot read {notes}: expected a .npz test set, a CIFAR-10/100 archive")


def test_undecodable_image_in_a_class_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path, weights: Path) -> None:
    (tmp_path / "val" / "cat").mkdir(parents=True)
    (tmp_path / "val" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    line = user_error(capsys, "eval", MODEL, "--weights", weights, "--data", tmp_path / "val", "--no-progress")
    assert "broken.jpg: cannot decode image (cannot identify image file" in line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-size", "0"], "the evaluation batch size must be >= 1, got 0"),
        (["--limit", "0"], "image limit must be at least 1, got 0"),
        (["--workers", "-1"], "number of data workers must be at least 0, got -1"),
    ],
)
def test_bad_evaluation_options(
    capsys: pytest.CaptureFixture[str], weights: Path, data: Path, argv: list[str], message: str
) -> None:
    line = user_error(capsys, "eval", MODEL, "--weights", weights, "--data", data, "--no-progress", *argv)
    assert line == f"dfq: error: {message}"


# --------------------------------------------------------------------------- run directories and checkpoints


def test_resume_with_nothing_to_resume(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    empty = tmp_path / "run"
    line = user_error(capsys, "quantize", MODEL, "--resume", "--out", empty)
    assert line == f"dfq: error: nothing to resume in {empty}: no config.yaml (was a run started there?)"
    (empty).mkdir()
    (empty / "config.yaml").write_text(f"model: {MODEL}\n")
    line = user_error(capsys, "quantize", MODEL, "--resume", "--out", empty)
    assert line == f"dfq: error: nothing to resume in {empty}: no checkpoint.pt"


def test_eval_run_dir_with_corrupt_model(capsys: pytest.CaptureFixture[str], tmp_path: Path, data: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.pt").write_bytes(b"garbage")
    line = user_error(capsys, "eval", tmp_path / "run", "--data", data)
    model = tmp_path / "run" / "model.pt"
    assert line == f"dfq: error: cannot read {model}: corrupt or not a dfq quantized checkpoint (UnpicklingError)"


def test_eval_dir_without_a_model(capsys: pytest.CaptureFixture[str], tmp_path: Path, data: Path) -> None:
    line = user_error(capsys, "eval", tmp_path, "--data", data)
    assert line == f"dfq: error: no dfq quantized checkpoint at {tmp_path / 'model.pt'}"


def test_eval_checkpoint_with_a_missing_tensor(capsys: pytest.CaptureFixture[str], tmp_path: Path, data: Path) -> None:
    config = resolve_config(None, {})
    path = save_quantized(tmp_path / "run" / "model.pt", quantize_model(create_model(MODEL), config.quant), config)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"].pop("layer2.1.conv1.weight")
    torch.save(payload, path)
    line = user_error(capsys, "eval", tmp_path / "run", "--data", data)
    assert line == (
        f"dfq: error: checkpoint {path} does not match model '{MODEL}': 1 missing key(s), first 'layer2.1.conv1.weight'"
    )


def test_eval_run_dir_with_weights(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, weights: Path, data: Path
) -> None:
    line = user_error(capsys, "eval", tmp_path, "--weights", weights, "--data", data)
    assert line == "dfq: error: --weights applies to a model name, not to a run directory"
