"""The README's Python example runs as written: a model outside the zoo, quantized from an example input,
exported with ``dfq.export_onnx`` without further arguments; the plug-in YAML of docs/methods.md resolves."""

import re
from pathlib import Path

import pytest
import torch

from dfq.compat import import_torchvision
from dfq.errors import DFQError

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_readme_python_example_runs(monkeypatch, tmp_path):
    block = re.search(r"## Python API\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert result.summary["method"] == "recon" and result.quant.protocol == "deploy"
    assert not hasattr(namespace["p"], "dfq_info") and result.input_size == (3, 32, 32)
    assert (tmp_path / "q.onnx").is_file() and namespace["report"]["integer_ops"].get("QLinearConv", 0) == 2
    assert namespace["pool"].shape == (256, 3, 32, 32) and bool(torch.isfinite(namespace["pool"]).all())


def test_readme_own_model_example_runs(monkeypatch, tmp_path):
    try:
        import_torchvision()
    except DFQError as e:
        pytest.skip(str(e))
    block = re.search(r"## Your own model.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in namespace["p"].modules())
    assert namespace["report"]["integer_ops"]["QLinearConv"] == convs  # every convolution on an integer kernel
    assert (tmp_path / "mv3.onnx").is_file()


def test_methods_doc_plugin_config_is_valid():
    """The plug-in YAML of docs/methods.md resolves to a run configuration with every plug-in on."""
    import yaml

    from dfq.config import resolve_config

    text = (ROOT / "docs" / "methods.md").read_text()
    block = re.search(r"## Plug-ins for any generator-based method.*?```yaml\n(.*?)```", text, re.S).group(1)
    config = resolve_config(yaml.safe_load(block))
    pl = config.method.plugins
    assert (pl.lowpass, pl.hard_tau, pl.cam_weight, pl.lsq, pl.adaround) == (0.5, 0.7, 100.0, True, True)
    assert config.quant.weight_scales == "stored"
