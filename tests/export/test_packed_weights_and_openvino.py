"""Sub-byte weight storage in the ONNX file, and OpenVINO as a second runtime for evaluation and parity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from dfq.cli import main
from dfq.errors import DFQError
from dfq.export.onnx import build_onnx, packed_type, write_onnx
from dfq.export.runtime import OnnxClassifier, optimized_op_counts, runner
from dfq.export.verify import verify
from dfq.quant import QuantConfig, calibrate, quantize_model

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SHAPE = (3, 16, 16)


class TwoConvs(nn.Module):
    """Enough weights (18k) for their storage to dominate the file."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64)
        self.relu, self.pool, self.fc = nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Linear(64, 10)

    def forward(self, x):
        x = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _quantized(wbits: int, abits: int = 8) -> tuple[nn.Module, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    q = quantize_model(TwoConvs().eval(), QuantConfig(protocol="deploy", wbits=wbits, abits=abits))
    calibrate(q, [torch.randn(8, *SHAPE, generator=g) for _ in range(2)])
    return q.eval(), [torch.randn(8, *SHAPE, generator=g) for _ in range(2)]


def _weight_codes(proto) -> dict[str, np.ndarray]:
    """Every weight's codes as stored (packed or int8), by layer."""
    out = {}
    for t in proto.graph.initializer:
        if "_weight_q" in t.name:
            out[t.name.split("_weight_q")[0]] = onnx.numpy_helper.to_array(t).astype(np.int8)
    return out


@pytest.mark.parametrize(
    ("bits", "storage", "expected"),
    [(8, "packed", None), (5, "packed", None), (4, "packed", "int4"), (3, "packed", "int4"), (2, "packed", "int2"),
     (2, "int4", "int4"), (4, "int4", "int4"), (8, "int4", None), (4, "int8", None), (2, "int8", None)],
)  # fmt: skip
def test_packed_type_by_bits_and_storage(bits, storage, expected):
    assert packed_type(bits, storage) == expected


def test_unknown_storage_is_refused():
    q, _ = _quantized(4)
    with pytest.raises(DFQError, match="unknown weight storage 'int3'"):
        build_onnx(q, SHAPE, weight_storage="int3")


@pytest.mark.parametrize(("bits", "packed", "opset"), [(4, onnx.TensorProto.INT4, 21), (2, onnx.TensorProto.INT2, 25)])
def test_packed_file_holds_the_same_codes_and_computes_the_same_numbers(bits, packed, opset, tmp_path):
    """INT4/INT2 initializers hold exactly the int8 container's codes; ONNX Runtime folds the Cast and still runs
    QLinearConv/QGemm, with outputs identical to the int8-container file, from 2 (4-bit) or 4 codes per byte."""
    q, batches = _quantized(bits)
    small, big = build_onnx(q, SHAPE, weight_storage="packed"), build_onnx(q, SHAPE, weight_storage="int8")
    assert small.opset_import[0].version == opset and big.opset_import[0].version == 17
    stored = [t.data_type for t in small.graph.initializer if "_weight_q" in t.name]
    assert stored == [packed] * 3  # conv1, conv2, fc
    assert _weight_codes(small).keys() == _weight_codes(big).keys()
    for layer, codes in _weight_codes(small).items():
        assert np.array_equal(codes, _weight_codes(big)[layer]), layer
    run_small, run_big = runner(small.SerializeToString()), runner(big.SerializeToString())
    for x in batches:
        assert np.array_equal(run_small(x.numpy())["logits"], run_big(x.numpy())["logits"])
    for t in small.graph.initializer:  # the bytes stored: two or four codes per byte
        if "_weight_q" in t.name:
            assert len(t.raw_data) == -(-int(np.prod(t.dims)) * bits // 8), t.name
    path = write_onnx(q, tmp_path / "m.onnx", SHAPE)
    ops = optimized_op_counts(path)
    assert ops.get("QLinearConv") == 2 and ops.get("QGemm") == 1 and "Cast" not in ops, ops


def test_8_bit_weights_keep_opset_17_without_casts():
    q, _ = _quantized(8)
    proto = build_onnx(q, SHAPE)
    assert proto.opset_import[0].version == 17 and proto.ir_version == 8
    assert not any(n.op_type == "Cast" for n in proto.graph.node)


def test_verify_checks_the_stored_form(monkeypatch):
    """--verify runs the storage that is exported: an int4 export is checked with int4 weights."""
    q, batches = _quantized(4)
    seen = []
    original = build_onnx

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weight_storage"))
        return original(*args, **kwargs)

    monkeypatch.setattr("dfq.export.verify.build_onnx", spy)
    result = verify(q, SHAPE, batches, weight_storage="int4")
    assert seen == ["int4"] and result["top1_agreement"] == 1.0


# --------------------------------------------------------------------------- OpenVINO


@pytest.fixture
def openvino():
    return pytest.importorskip("openvino", reason="OpenVINO not installed (pip install openvino)")


def test_openvino_runs_every_layer_on_int8_kernels_with_q_predictions(openvino, tmp_path):
    from dfq.export.openvino import compile_model, executed_precisions

    q, batches = _quantized(4, 8)
    path = write_onnx(q, tmp_path / "m.onnx", SHAPE, weight_storage="int4")
    precisions = executed_precisions(compile_model(path))
    assert precisions.get("Convolution:u8") == 2 and precisions.get("FullyConnected:u8") == 1, precisions
    assert not any(k.endswith(("f32", "bf16")) for k in precisions if not k.startswith("Eltwise")), precisions
    result = verify(q, SHAPE, batches, weight_storage="int4", runtime="openvino")
    assert result["runtime"] == "openvino" and result["images"] == 16
    assert result["top1_agreement"] == 1.0
    assert {s["site"] for s in result["sites"]} == {n for n, m in q.named_modules() if n.endswith("quantizer")
                                                    and m.__class__.__name__ == "ActQuantizer"}  # fmt: skip
    assert max(s["max_lsb"] for s in result["sites"]) <= 1.0  # two runtimes, same integer grids
    ov_logits = OnnxClassifier(path, runtime="openvino")(batches[0])
    with torch.no_grad():
        assert torch.allclose(ov_logits, q(batches[0]), atol=0.05 * float(q(batches[0]).abs().max()))


def _npz(path, n=12):
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), labels=np.arange(n) % 10)
    return path


def _tiny_deploy_run(tmp_path, random_weights, capsys):
    run = tmp_path / "run"
    rc = main(["quantize", "resnet20a_cifar10", "--method", "zeroq", "--protocol", "deploy", "--wbits", "2",
               "--abits", "4", "--weights", str(random_weights), "--out", str(run), "--set", "method.steps=2",
               "--set", "method.num_samples=4", "--no-progress"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    return run


def test_cli_eval_on_openvino_matches_onnxruntime_and_int2_is_refused_in_one_line(
    openvino, random_weights, tmp_path, capsys
):
    run, data = _tiny_deploy_run(tmp_path, random_weights, capsys), _npz(tmp_path / "d.npz")
    sizes = {}
    for storage in ("packed", "int4"):
        out = tmp_path / f"{storage}.onnx"
        assert main(["export", str(run), "--out", str(out), "--weight-storage", storage, "--json"]) == 0
        sizes[storage] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bytes"]
    assert sizes["packed"] < sizes["int4"]  # W2: INT2 codes are half the INT4 ones

    results = {}
    for rt in ("onnxruntime", "openvino"):
        rc = main(["eval", str(tmp_path / "int4.onnx"), "--data", str(data), "--runtime", rt, "--json",
                   "--no-progress"])  # fmt: skip
        out, err = capsys.readouterr()
        assert rc == 0, err
        results[rt] = json.loads(out.strip().splitlines()[-1])
    assert results["openvino"]["runtime"] == "openvino" and "(OpenVINO)" in out
    assert results["openvino"]["n"] == results["onnxruntime"]["n"] == 12

    rc = main(["eval", str(tmp_path / "packed.onnx"), "--data", str(data), "--runtime", "openvino", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "OpenVINO cannot load" in err, err
    rc = main(["eval", str(run), "--data", str(data), "--runtime", "openvino", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--runtime applies to an exported .onnx file" in err, err
