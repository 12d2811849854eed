"""The README's Python example runs as written."""

import re
from pathlib import Path

import torch
from conftest import RESNET20_WEIGHTS, require_shared

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(monkeypatch):
    require_shared(RESNET20_WEIGHTS)
    block = re.search(r"## Python API\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(README.parent)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace: dict = {}
    try:
        exec(compile(block, "README.md", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    assert namespace["summary"]["method"] == "adadfq"
    assert type(namespace["q"].conv).__name__ == "QuantConv2d"


def test_readme_plugin_config_is_valid():
    """The plug-in YAML of the README resolves to a run configuration with every plug-in on."""
    import yaml

    from dfq.config import resolve_config

    block = re.search(r"### Plug-ins and fast mode.*?```yaml\n(.*?)```", README.read_text(), re.S).group(1)
    config = resolve_config(yaml.safe_load(block), {"method": "adadfq"})
    pl = config.plugins
    assert (pl.lowpass, pl.hard_tau, pl.cam_weight, pl.lsq, pl.adaround, config.train.fast) == (
        0.5, 0.7, 100.0, True, True, True
    )  # fmt: skip
    assert config.quant.weight_scales == "stored"
