"""torchvision and timm architectures by name (``tv:NAME``, ``timm:NAME``) with the user's weights file.

The libraries are optional: tests that build their models skip when they cannot be imported; the one-line
install message for a missing library is checked either way.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dfq
from dfq.cli import main
from dfq.compat import import_timm, import_torchvision
from dfq.errors import DFQError
from dfq.models import create_model, get_model_info

ROOT = Path(__file__).resolve().parents[2]
TINY_ZEROQ = dfq.methods.ZeroQConfig(steps=2, num_samples=2)


def _importable(importer) -> str:
    """'' when the library imports (through dfq's workaround), else why not."""
    try:
        importer()
    except DFQError as e:
        return str(e)
    return ""


_NO_TV = _importable(import_torchvision)
_NO_TIMM = _importable(import_timm)
needs_tv = pytest.mark.skipif(bool(_NO_TV), reason=f"torchvision not importable: {_NO_TV}")
needs_timm = pytest.mark.skipif(bool(_NO_TIMM), reason=f"timm not importable: {_NO_TIMM}")


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@needs_tv
def test_tv_model_builds_and_loads_its_own_state_dict(tmp_path: Path) -> None:
    model = create_model("tv:resnet18")
    info = model.dfq_info
    assert (info.name, info.num_classes, info.input_size, info.weights) == ("tv:resnet18", 1000, (3, 224, 224), {})
    path = tmp_path / "r18.pth"
    torch.save(model.state_dict(), path)
    again = create_model("tv:resnet18", weights=path)
    assert _same_state(model, again)
    with pytest.raises(DFQError, match=r"does not match model 'tv:resnet34'.*missing key"):
        create_model("tv:resnet34", weights=path)
    with pytest.raises(DFQError, match="no published weights; pass --weights FILE"):
        create_model("tv:resnet18", pretrained=True)


@needs_tv
def test_tv_model_input_size_follows_its_weights_preprocessing() -> None:
    assert get_model_info("tv:inception_v3").input_size == (3, 299, 299)


@needs_tv
def test_quantize_a_torchvision_model() -> None:
    result = dfq.quantize(create_model("tv:resnet18"), dfq.QuantConfig(wbits=4, abits=4), method=TINY_ZEROQ,
                          example_inputs=torch.randn(1, 3, 64, 64), progress=False)  # fmt: skip
    assert result.summary["method"] == "zeroq" and result.input_size == (3, 64, 64)
    with torch.no_grad():
        assert bool(torch.isfinite(result.model(torch.randn(2, 3, 64, 64))).all())


@needs_tv
def test_mobilenet_v3_quantizes_and_exports_on_integer_kernels(tmp_path: Path) -> None:
    """Hardswish, squeeze-excitation with Hardsigmoid gates: every convolution runs on an integer kernel."""
    torch.manual_seed(0)
    model = create_model("tv:mobilenet_v3_small")
    x = torch.randn(8, 3, 64, 64)
    model.train()(x)  # BatchNorm statistics of these inputs (random init makes activations vanish)
    result = dfq.quantize(model.eval(), dfq.QuantConfig(wbits=8, abits=8, protocol="deploy"), method=TINY_ZEROQ,
                          example_inputs=x[:1], progress=False)  # fmt: skip
    acts = {type(m.act).__name__ for m in result.model.modules() if hasattr(m, "act_quantizer")}
    assert {"Hardswish", "Hardsigmoid", "ReLU"} <= acts
    exported = dfq.export_onnx(result, tmp_path / "m.onnx", verify=[x])
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert exported["integer_ops"]["QLinearConv"] == convs and "Conv" not in exported["float_ops"]
    assert exported["verify"]["top1_agreement"] == 1.0


@needs_timm
def test_timm_model_builds_loads_and_reads_its_pretrained_cfg(tmp_path: Path) -> None:
    model = create_model("timm:efficientnet_lite0")
    assert model.dfq_info.input_size == (3, 224, 224) and model.dfq_info.num_classes == 1000
    torch.save({"state_dict": model.state_dict()}, tmp_path / "lite0.pth")
    assert _same_state(model, create_model("timm:efficientnet_lite0", weights=tmp_path / "lite0.pth"))
    info = get_model_info("timm:inception_v3.tf_in1k")  # the model's own resolution and normalization
    assert (info.input_size, info.mean, info.std) == ((3, 299, 299), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@needs_tv
@needs_timm
@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("tv:resnet81", "torchvision has no classification model 'resnet81' (did you mean 'resnet18'?)"),
        ("timm:efficientnet_lite9", "timm has no model 'efficientnet_lite9' (did you mean 'efficientnet_lite"),
        ("timm:resnet18.a1_in1kk", "(did you mean 'resnet18.a1_in1k'?)"),
        ("tvv:resnet18", "unknown model prefix 'tvv:' in 'tvv:resnet18' (did you mean 'tv:'?)"),
    ],
)
def test_misspelled_names_get_a_hint(name: str, hint: str) -> None:
    with pytest.raises(DFQError) as err:
        create_model(name)
    assert hint in str(err.value)


@pytest.mark.parametrize(("name", "blocked"), [("tv:resnet18", "torchvision"), ("timm:resnet18", "timm")])
def test_missing_library_gives_the_install_line(monkeypatch, capsys, name: str, blocked: str) -> None:
    monkeypatch.setitem(sys.modules, blocked, None)  # what `import` sees when the package is not installed
    rc = main(["eval", name, "--weights", "none.pth", "--data", "none.npz"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"error: {blocked} " in err and "is not installed" in err and "pip install --no-deps torchvision==" in err


@needs_tv
def test_cli_quantize_and_eval_a_torchvision_model(tmp_path: Path, capsys) -> None:
    path = tmp_path / "r18.pth"
    torch.save(create_model("tv:resnet18").state_dict(), path)
    rng = np.random.default_rng(0)
    data = tmp_path / "val.npz"
    np.savez(data, images=rng.integers(0, 256, (4, 224, 224, 3), dtype=np.uint8), labels=np.array([0, 1, 2, 999]))
    run = tmp_path / "run"
    rc = main(["quantize", "tv:resnet18", "--method", "zeroq", "--wbits", "8", "--abits", "8", "--weights", str(path),
               "--data", str(data), "--out", str(run), "--set", "method.steps=2", "--set", "method.num_samples=2",
               "--no-progress", "--json"])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["model"] == "tv:resnet18" and summary["n"] == 4 and "top1" in summary
    assert main(["eval", str(run), "--data", str(data), "--json"]) == 0  # the run rebuilds tv:resnet18
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["model"] == "tv:resnet18"
    assert main(["models"]) == 0 and "tv:NAME and timm:NAME" in capsys.readouterr().out


@needs_tv
def test_plain_import_workaround_in_a_fresh_interpreter() -> None:
    """Where PyPI's CUDA torchvision sits beside a CPU torch, the first import is the one that needs the shim."""
    code = "from dfq.compat import import_torchvision; print(type(import_torchvision().models.resnet18()).__name__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ResNet", proc.stderr
