"""Model registry: create float classifiers by name, with their metadata attached.

Each registered model declares a :class:`ModelInfo` (classes, input size,
normalization, published weights). ``create_model`` returns a plain float
``nn.Module`` with ``model.dfq_info`` set; quantization knows nothing of it and
the model knows nothing of quantization.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dfq.errors import DFQError
from dfq.hub import RemoteFile, fetch
from dfq.registry import Registry
from dfq.utils.state import state_dict_mismatch

__all__ = [
    "ModelInfo",
    "WeightSource",
    "create_model",
    "get_model_info",
    "list_models",
    "load_weights",
    "register_model",
]

StateDict = dict[str, torch.Tensor]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR10_STD = (0.24703233, 0.24348505, 0.26158768)
CIFAR100_MEAN = (0.50705882, 0.48666667, 0.44078431)
CIFAR100_STD = (0.26745098, 0.25568627, 0.27607843)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class WeightSource:
    """A published checkpoint and how to map its keys onto the dfq model.

    Attributes:
        remote: where to download it and its checksum.
        layout: the checkpoint's key convention ("akamaster", "pytorchcv", "torchvision").
        license: licence of the weights, as published.
        top1: the publisher's full-precision top-1 on its test set, for reference.
    """

    remote: RemoteFile
    layout: str
    license: str
    top1: float | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What a user needs to feed a model and read its output: its preprocessing record among the rest.

    An image becomes an input as timm's pretrained configs describe it: resized so that the centre crop of
    ``crop_fraction`` of the resized image is ``input_size`` (``interpolation``), then ``x = (pixel / 255 -
    mean) / std`` per RGB channel. ``pixel_mean``/``pixel_std`` are the statistics of typical images (in
    [0, 1] units): ``None`` means ``mean``/``std``, which normalise by the training set's statistics in the
    usual case; models fed raw or rescaled pixels (ResNet-8: ``x = pixel``) name them, so that synthetic
    images start where real ones lie.
    """

    name: str
    dataset: str  # "cifar10", "cifar100" or "imagenet"
    num_classes: int
    input_size: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: Mapping[str, WeightSource] = field(default_factory=dict)  # tag -> source; first is default
    description: str = ""
    crop_fraction: float = 1.0
    interpolation: str = "bicubic"
    pixel_mean: tuple[float, float, float] | None = None
    pixel_std: tuple[float, float, float] | None = None

    def input_range(self) -> tuple[float, float]:
        """The range of valid inputs over all channels: pixels 0 and 255 after the normalisation."""
        ends = [((0.0 - m) / s, (1.0 - m) / s) for m, s in zip(self.mean, self.std, strict=True)]
        return min(lo for lo, _ in ends), max(hi for _, hi in ends)

    def input_bounds(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel lowest and highest valid input: pixels 0 and 255 of each channel after the normalisation."""
        lows = tuple((0.0 - m) / s for m, s in zip(self.mean, self.std, strict=True))
        return lows, tuple((1.0 - m) / s for m, s in zip(self.mean, self.std, strict=True))

    def input_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """Per-channel mean and std of typical inputs: the pixel statistics after the normalisation; ``None``
        where the normalisation uses them (inputs standardised: mean 0, std 1)."""
        if self.pixel_mean is None and self.pixel_std is None:
            return None
        pm, ps = self.pixel_mean or self.mean, self.pixel_std or self.std
        mean = tuple((p - m) / s for p, m, s in zip(pm, self.mean, self.std, strict=True))
        return mean, tuple(p / s for p, s in zip(ps, self.std, strict=True))

    def preprocessing(self) -> dict[str, object]:
        """The preprocessing record, as checkpoints and exported files carry it."""
        return {"input_size": list(self.input_size), "crop_fraction": self.crop_fraction,
                "interpolation": self.interpolation, "mean": list(self.mean), "std": list(self.std),
                "input_range": list(self.input_range())}  # fmt: skip


def imagenet_info(name: str, weights: Mapping[str, WeightSource], description: str) -> ModelInfo:
    """ModelInfo of a 1000-class 224x224 ImageNet classifier with the usual preprocessing (torchvision's: resize
    to 256, centre crop 224, bilinear)."""
    return ModelInfo(name, "imagenet", 1000, (3, 224, 224), IMAGENET_MEAN, IMAGENET_STD, weights, description,
                     crop_fraction=0.875, interpolation="bilinear")  # fmt: skip


_MODELS = Registry[tuple[ModelInfo, Callable[..., nn.Module]]]("model", hint="`dfq models` lists them")

# layout name -> converter from that layout's state dict to dfq's keys.
_LAYOUTS: dict[str, Callable[[StateDict], StateDict]] = {}


def register_model(info: ModelInfo) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a factory ``fn(num_classes) -> nn.Module`` under ``info.name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _MODELS.add(info.name, (info, fn))
        return fn

    return deco


def register_layout(name: str) -> Callable[[Callable[[StateDict], StateDict]], Callable[[StateDict], StateDict]]:
    """Decorator registering a state-dict key converter for a checkpoint layout."""

    def deco(fn: Callable[[StateDict], StateDict]) -> Callable[[StateDict], StateDict]:
        _LAYOUTS[name] = fn
        return fn

    return deco


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``, sorted."""
    return _MODELS.names(pattern)


def get_model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of a registered model (clear error if unknown)."""
    return _entry(name)[0]


def _entry(name: str) -> tuple[ModelInfo, Callable[..., nn.Module]]:
    if ":" in name:  # tv:NAME, timm:NAME: a torchvision or timm architecture (dfq.models.external)
        from dfq.models.external import external_entry

        return external_entry(name)
    return _MODELS.get(name)


def create_model(
    name: str,
    pretrained: bool | str = False,
    *,
    weights: str | Path | None = None,
    progress: bool = True,
) -> nn.Module:
    """Build a registered float model, optionally with pretrained weights.

    Args:
        name: registered model name (see :func:`list_models`), or ``tv:NAME`` / ``timm:NAME`` for a
            torchvision or timm architecture (weights only from ``weights``).
        pretrained: ``True`` for the default published weights, or a weight tag
            (a key of ``ModelInfo.weights``, e.g. ``"torchvision"``).
        weights: a local checkpoint file; overrides ``pretrained``.
        progress: show a download progress bar.

    Example:
        >>> model = create_model("resnet20a_cifar10")
        >>> model.dfq_info.num_classes
        10
    """
    info, factory = _entry(name)
    model = factory(num_classes=info.num_classes)
    model.dfq_info = info  # type: ignore[assignment]
    if weights is not None:
        load_weights(model, weights)
    elif pretrained:
        source = _pick_source(info, pretrained)
        path = fetch(source.remote, subdir="weights", progress=progress)
        load_weights(model, path, layout=source.layout)
    return model.eval()


def _pick_source(info: ModelInfo, pretrained: bool | str) -> WeightSource:
    if not info.weights:
        raise DFQError(f"model '{info.name}' has no published weights; pass --weights FILE")
    if pretrained is True:
        return next(iter(info.weights.values()))
    if pretrained not in info.weights:
        raise DFQError(f"model '{info.name}' has no weights '{pretrained}'; available: {', '.join(info.weights)}")
    return info.weights[str(pretrained)]


def read_state_dict(path: str | Path) -> StateDict:
    """Load a checkpoint's tensors safely (``weights_only``), unwrapping common containers."""
    path = Path(path)
    if not path.is_file():
        raise DFQError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt/foreign files
        raise DFQError(
            f"cannot read weights file {path}: not a PyTorch checkpoint or corrupt ({type(e).__name__})"
        ) from e
    for key in ("state_dict", "model", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DFQError(f"weights file {path} does not hold a state dict of tensors")
    # Checkpoints saved from nn.DataParallel prefix every key with "module.".
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights(model: nn.Module, path: str | Path, layout: str | None = None) -> None:
    """Load a checkpoint into ``model``, converting known layouts; clear error on mismatch.

    With ``layout=None`` every registered layout converter is tried and the first
    one whose keys and shapes fit the model is used.
    """
    state = read_state_dict(path)
    expected = model.state_dict()
    candidates = [layout] if layout else ["native", *_LAYOUTS]
    problems = ""
    for name in candidates:
        converted = state if name == "native" else _convert(name, state)
        if converted is None:
            continue
        converted = _fill_bn_counters(expected, converted)
        problems = state_dict_mismatch(expected, converted)
        if not problems:
            model.load_state_dict(converted, strict=True)
            return
    target = getattr(model, "dfq_info", None)
    what = target.name if target else type(model).__name__
    raise DFQError(f"weights file {path} does not match model '{what}': {problems or 'unknown layout'}")


def _convert(layout: str, state: StateDict) -> StateDict | None:
    try:
        return _LAYOUTS[layout](state)
    except (KeyError, ValueError, IndexError):
        return None


def _fill_bn_counters(expected: Mapping[str, torch.Tensor], got: StateDict) -> StateDict:
    """Add BatchNorm ``num_batches_tracked`` counters that old checkpoints (PyTorch < 0.4.1) lack."""
    missing = {k: expected[k] for k in expected if k.endswith("num_batches_tracked") and k not in got}
    return {**got, **missing} if missing else got
