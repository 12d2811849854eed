"""The public surface: one method registry, the typed Python API, synthetic calibration data, config layout."""

from __future__ import annotations

import json
import runpy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import dfq
from dfq.api import load_run_config
from dfq.cli import main
from dfq.config import resolve_config
from dfq.errors import DFQError
from dfq.methods import METHODS, Method, MethodContext, ReconConfig, ZeroQConfig, register_method
from dfq.quant import QuantConfig, calibrate, quantize_model
from dfq.registry import Registry
from dfq.testing import INPUT_SIZE, tiny_classifier

ROOT = Path(__file__).resolve().parents[1]
MODEL = "resnet20a_cifar10"


def _tiny() -> nn.Module:
    return tiny_classifier()


EXAMPLE = torch.zeros(1, *INPUT_SIZE)


# --------------------------------------------------------------------------- a method added from outside


@dataclass
class ToyConfig:
    """Attributes:
    samples: Gaussian inputs the ranges are calibrated on.
    """

    samples: int = 8


class Toy(Method):
    """Calibrates Q's ranges on Gaussian noise: the smallest method the protocol allows."""

    name = "toy"
    config_cls = ToyConfig
    description = "a test method: ranges calibrated on Gaussian noise"

    def quantize(self, teacher: nn.Module, quant: QuantConfig, ctx: MethodContext) -> tuple[nn.Module, dict]:
        q = quantize_model(teacher, quant)
        calibrate(q, [torch.randn(self.config.samples, *ctx.input_size, generator=ctx.generator)])
        return q.eval(), {"samples": self.config.samples, "classes": ctx.num_classes}


@pytest.fixture
def toy():
    register_method(Toy)
    try:
        yield Toy
    finally:
        del METHODS["toy"]


def test_a_method_registered_from_outside_runs_through_the_python_api(toy):
    result = dfq.quantize(_tiny(), QuantConfig(wbits=8, abits=8), "toy", example_inputs=EXAMPLE, progress=False)
    seconds = result.summary.pop("seconds")
    costs = {"weight_bytes": 2104.0, "avg_wbits": 8.0, "bops": 4433920}  # the tiny model's weights, 8 bits x 8 bits
    assert result.summary == {"method": "toy", "wbits": 8, "abits": 8, "samples": 8, "classes": 10, **costs}
    assert seconds >= 0
    typed = dfq.quantize(_tiny(), QuantConfig(wbits=8, abits=8), ToyConfig(samples=3), example_inputs=EXAMPLE)
    assert typed.summary["samples"] == 3 and typed.method == ToyConfig(samples=3)
    assert "toy" in dfq.list_methods()


def test_a_method_registered_from_outside_runs_through_the_cli(toy, tmp_path, capsys, random_weights):
    assert main(["methods", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["methods"]
    assert {"name": "toy", "description": Toy.description} in listed
    run = tmp_path / "run"
    argv = ["quantize", MODEL, "--method", "toy", "--set", "method.samples=4", "--wbits", "8", "--abits", "8",
            "--weights", str(random_weights), "--out", str(run), "--json", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["method"], summary["samples"], summary["classes"]) == ("toy", 4, 10)
    assert yaml.safe_load((run / "config.yaml").read_text())["method"] == {"name": "toy", "samples": 4}
    assert load_run_config(run).method == ToyConfig(samples=4)


def test_dfq_methods_lists_every_builtin_method_with_one_line(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = ["adadfq", "adasg", "cle", "gdfq", "gptq", "recon", "squant", "zaq", "zeroq"]
    assert [line.split()[0] for line in lines] == names
    assert all(len(line.split(maxsplit=1)[1]) > 20 for line in lines)


def test_unknown_names_get_a_did_you_mean_hint():
    with pytest.raises(DFQError, match=r"unknown method 'recno' \(did you mean 'recon'\?\); `dfq methods` lists"):
        dfq.quantize(_tiny(), method="recno", example_inputs=EXAMPLE)
    with pytest.raises(DFQError, match=r"unknown model 'resnet20_cifar1' \(did you mean"):
        dfq.create_model("resnet20_cifar1")
    registry = Registry[int]("colour")
    registry.add("red", 1)
    with pytest.raises(ValueError, match="registered twice"):
        registry.add("red", 2)
    assert registry.get("blue", None) is None and registry.names() == ["red"]


def test_a_method_config_of_the_wrong_class_is_refused():
    from dfq.methods import create_method

    with pytest.raises(DFQError, match="takes a ReconConfig"):
        create_method("recon", ZeroQConfig())
    with pytest.raises(DFQError, match="not the config of a registered method"):
        dfq.quantize(_tiny(), method=QuantConfig(), example_inputs=EXAMPLE)


# --------------------------------------------------------------------------- typed API on a model outside the zoo


def test_quantize_reads_input_size_and_classes_from_an_example_input():
    p = _tiny()
    before = {k: v.clone() for k, v in p.state_dict().items()}
    result = dfq.quantize(p, QuantConfig(wbits=8, abits=8, protocol="deploy"), ZeroQConfig(steps=2, num_samples=4),
                          example_inputs=torch.randn(2, *INPUT_SIZE), progress=False)  # fmt: skip
    assert result.input_size == INPUT_SIZE and result.quant.weight_symmetric
    assert result.model(torch.randn(3, *INPUT_SIZE)).shape == (3, 10)
    assert all(torch.equal(v, before[k]) for k, v in p.state_dict().items())
    with pytest.raises(DFQError, match=r"\(batch, classes\)"):
        dfq.quantize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), example_inputs=EXAMPLE)


def test_export_onnx_writes_a_deploy_result_and_refuses_the_papers_protocol(tmp_path):
    pytest.importorskip("onnxruntime")
    method = ZeroQConfig(steps=2, num_samples=4)
    deploy = dfq.quantize(_tiny(), QuantConfig(wbits=8, abits=8), method, example_inputs=EXAMPLE)  # the default
    report = dfq.export_onnx(deploy, tmp_path / "q.onnx", verify=True)
    assert report["integer_ops"]["QLinearConv"] >= 3 and report["verify"]["top1_agreement"] == 1.0
    from dfq.export.runtime import read_metadata

    meta = read_metadata(tmp_path / "q.onnx")
    assert (meta["method"], meta["wbits"], meta["protocol"]) == ("zeroq", 8, "deploy")
    assert meta["input_size"] == list(INPUT_SIZE)
    paper = dfq.quantize(_tiny(), QuantConfig(wbits=8, abits=8, protocol="paper"), method, example_inputs=EXAMPLE)
    for target in (paper, paper.model):
        with pytest.raises(DFQError, match="protocol='deploy'"):
            dfq.export_onnx(target, tmp_path / "paper.onnx")
    assert not (tmp_path / "paper.onnx").exists()


# --------------------------------------------------------------------------- synthetic calibration data


def test_synthesize_feeds_onnxruntime_quantize_static_as_its_calibration_reader(tmp_path):
    """dfq's pool is calibration data for another toolchain: ONNX Runtime's own static quantizer."""
    ort_quant = pytest.importorskip("onnxruntime.quantization")
    from dfq.export.runtime import session

    p = _tiny()
    pool = dfq.synthesize(p, 32, example_inputs=EXAMPLE, steps=30, progress=False)
    assert pool.shape == (32, *INPUT_SIZE) and pool.dtype == torch.float32 and bool(torch.isfinite(pool).all())
    dfq.export_onnx(p, tmp_path / "float.onnx", example_inputs=EXAMPLE)
    name = session(tmp_path / "float.onnx").get_inputs()[0].name

    reader = dfq.calibration.onnxruntime_reader(pool, name, batch_size=8)
    assert isinstance(reader, ort_quant.CalibrationDataReader) and len(reader) == 4
    ort_quant.quantize_static(tmp_path / "float.onnx", tmp_path / "int8.onnx", reader,
                              quant_format=ort_quant.QuantFormat.QDQ)  # fmt: skip
    assert reader.served == 4
    reader.rewind()
    assert np.array_equal(reader.get_next()[name], pool[:8].numpy())  # served again from the start
    x = torch.randn(64, *INPUT_SIZE, generator=torch.Generator().manual_seed(1))
    out = session(tmp_path / "int8.onnx").run(None, {name: x.numpy()})[0]
    with torch.no_grad():
        ref = p(x).numpy()
    assert out.shape == ref.shape and np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.95


def test_synthesize_cli_writes_an_npz_a_toolchain_can_read(tmp_path, capsys, random_weights):
    out = tmp_path / "pool.npz"
    argv = ["synthesize", MODEL, "--weights", str(random_weights), "--num", "6", "--steps", "2",
            "--out", str(out), "--json", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with np.load(out) as f:
        assert f["images"].shape == (6, 3, 32, 32) and f["images"].dtype == np.float32
        assert f["mean"].shape == (3,) and f["std"].shape == (3,)
        assert report["min"] == pytest.approx(float(f["images"].min()))
    assert main(argv) == 2  # an existing file is not replaced without --overwrite
    zeroq = dfq.synthesize(_tiny(), 4, example_inputs=EXAMPLE, synthesizer="pixels", steps=3, progress=False)
    assert zeroq.shape == (4, *INPUT_SIZE)
    with pytest.raises(DFQError, match="unknown synthesizer"):
        dfq.synthesize(_tiny(), 4, example_inputs=EXAMPLE, synthesizer="gan")


# --------------------------------------------------------------------------- config layout


@pytest.mark.parametrize("method", ["recon", "zaq"])
def test_a_config_yaml_of_the_earlier_flat_layout_still_loads(method):
    """Run directories written by dfq 0.1 (sections zeroq:, recon:, train:, ... side by side) load as today's."""
    old = yaml.safe_load((ROOT / "tests" / "fixtures" / f"config_v0.1_{method}.yaml").read_text())
    assert old["method"] == method and "train" in old and "zeroq" in old
    config = resolve_config(old)
    expected = {"method.name": method, "quant.protocol": "paper", **({"method.train.epochs": 3} if method == "zaq"
                                                                     else {})}  # fmt: skip
    assert config == resolve_config(None, expected)  # 0.1 wrote its protocol, the papers' (its default)
    assert resolve_config(config.to_dict()) == config


def test_set_reaches_every_key_and_a_conflict_is_an_error():
    overrides = {"method.train.iters_per_epoch": 7, "method.temperature": 4.0, "quant.abits": 3}
    config = resolve_config({"method": {"name": "gdfq", "train": {"epochs": 5}}}, overrides)
    train = config.method.train
    assert (train.epochs, train.iters_per_epoch, train.batch_size) == (5, 7, 200)  # gdfq's own batch survives
    assert (config.method.temperature, config.quant.abits) == (4.0, 3)
    assert resolve_config({"method": {"name": "gdfq", "plugins": {"lsq": True}}}).quant.weight_scales == "stored"
    with pytest.raises(DFQError, match=r"plugins\.lsq and plugins\.adaround learn the weight steps"):
        resolve_config({"method": {"name": "gdfq", "plugins": {"lsq": True}}, "quant": {"weight_scales": "minmax"}})
    with pytest.raises(DFQError, match="the deploy protocol needs weight_symmetric=True"):
        QuantConfig(protocol="deploy", weight_symmetric=False)


def test_configuration_doc_is_generated_from_the_dataclasses():
    script = runpy.run_path(str(ROOT / "scripts" / "gen_config_docs.py"))
    assert (ROOT / "docs" / "configuration.md").read_text() == script["render"](), (
        "docs/configuration.md is out of date: run python scripts/gen_config_docs.py"
    )


def test_recon_config_is_the_default_method():
    assert isinstance(resolve_config().method, ReconConfig) and resolve_config().method_name == "recon"


def test_a_pool_file_reads_back_and_feeds_nncf(tmp_path, random_weights):
    """save_pool -> load_pool round-trips (.npz and .npy); a zoo model's images lie in its valid input range; the
    NNCF adapter serves them as an ONNX model's named inputs."""
    from dfq.deploy import save_pool

    p = dfq.create_model(MODEL, weights=str(random_weights))
    pool = dfq.synthesize(p, 6, steps=3, progress=False)
    lows, highs = (torch.tensor(v).view(1, -1, 1, 1) for v in p.dfq_info.input_bounds())
    assert bool((pool >= lows).all() and (pool <= highs).all())  # pixels 0..255 after the normalisation
    for suffix in (".npz", ".npy"):
        path = save_pool(pool, tmp_path / f"pool{suffix}", p)
        assert np.array_equal(dfq.calibration.load_pool(path), pool.numpy())
    assert [len(b) for b in dfq.calibration.pool_batches(pool, 4)] == [4, 2]
    (tmp_path / "bad.npz").write_bytes(b"not numpy")
    for bad, fragment in (("missing.npz", "not found"), ("bad.npz", "not a dfq synthetic pool")):
        with pytest.raises(DFQError, match=fragment):
            dfq.calibration.load_pool(tmp_path / bad)
    pytest.importorskip("nncf")
    dataset = dfq.calibration.nncf_dataset(pool, "input", batch_size=3)
    items = list(dataset.get_inference_data())
    assert len(items) == 2 and np.array_equal(items[0]["input"], pool[:3].numpy())
