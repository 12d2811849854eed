"""Architectures from torchvision and timm by name: ``tv:NAME`` and ``timm:NAME``.

``create_model("tv:resnet18", weights=FILE)`` and ``dfq quantize timm:efficientnet_lite0 --weights FILE``
build the library's own float model (random init, ``pretrained=False``) and load the user's state dict into it,
key for key: dfq downloads nothing for these names, so a user's own fine-tuned or private weights work the same
way as the library's published ones. The :class:`ModelInfo` attached gives ImageNet's defaults unless the library
records the model's own input size or normalization (timm's ``pretrained_cfg``, torchvision's weight transforms),
so ``--data`` evaluation feeds the model what it was trained on.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from dfq.compat import import_timm, import_torchvision
from dfq.errors import DFQError, did_you_mean
from dfq.models._registry import IMAGENET_MEAN, IMAGENET_STD, ModelInfo

__all__ = ["PREFIXES", "external_entry"]

PREFIXES = {"tv": "torchvision", "timm": "timm"}


def external_entry(name: str) -> tuple[ModelInfo, Callable[..., nn.Module]]:
    """The model info and a factory ``fn(num_classes=...)`` of ``tv:NAME`` or ``timm:NAME``."""
    prefix, _, arch = name.partition(":")
    if prefix == "tv":
        return _torchvision_entry(name, arch)
    if prefix == "timm":
        return _timm_entry(name, arch)
    raise DFQError(
        f"unknown model prefix '{prefix}:' in '{name}'{did_you_mean(prefix + ':', [p + ':' for p in PREFIXES])}; "
        "use tv:NAME (torchvision) or timm:NAME (timm)"
    )


def _info(
    name: str, library: str, num_classes: int, input_size: Any, mean: Any, std: Any,
    crop_fraction: float = 0.875, interpolation: str = "bilinear",
) -> ModelInfo:  # fmt: skip
    dataset = "imagenet" if num_classes == 1000 else "custom"
    return ModelInfo(name, dataset, num_classes, tuple(input_size), tuple(mean), tuple(std),
                     description=f"{library} architecture; weights from --weights FILE",
                     crop_fraction=float(crop_fraction), interpolation=str(interpolation))  # fmt: skip


def _torchvision_entry(name: str, arch: str) -> tuple[ModelInfo, Callable[..., nn.Module]]:
    tv = import_torchvision()
    known = tv.models.list_models(module=tv.models)  # classification models only
    if arch not in known:
        raise DFQError(f"torchvision has no classification model '{arch}'{did_you_mean(arch, known)}")
    # Models trained at another resolution (inception_v3: 299) record it in their weights' preprocessing.
    crop = 224
    weights = list(tv.models.get_model_weights(arch))
    if weights and isinstance(weights[0].transforms, partial):
        crop = weights[0].transforms.keywords.get("crop_size", crop)
    info = _info(name, "torchvision", 1000, (3, crop, crop), IMAGENET_MEAN, IMAGENET_STD)
    return info, partial(_build_torchvision, arch)


def _build_torchvision(arch: str, num_classes: int) -> nn.Module:
    return import_torchvision().models.get_model(arch, weights=None, num_classes=num_classes)


def _timm_entry(name: str, arch: str) -> tuple[ModelInfo, Callable[..., nn.Module]]:
    timm = import_timm()
    base, _, tag = arch.partition(".")  # timm names may carry a weights tag: resnet18.a1_in1k
    if not timm.is_model(base):
        raise DFQError(f"timm has no model '{base}'{did_you_mean(base, timm.list_models())}")
    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except RuntimeError as e:  # an unknown tag
        hint = did_you_mean(arch, timm.list_pretrained(f"{base}.*"))
        raise DFQError(f"timm has no weights tag '{tag}' for '{base}'{hint}") from e
    num_classes = (cfg.num_classes if cfg else 0) or 1000  # 0: a headless feature extractor; dfq needs logits
    if cfg is None:
        info = _info(name, "timm", num_classes, (3, 224, 224), IMAGENET_MEAN, IMAGENET_STD)
    else:
        info = _info(name, "timm", num_classes, cfg.input_size, cfg.mean, cfg.std, cfg.crop_pct or 0.875,
                     cfg.interpolation or "bicubic")  # fmt: skip
    return info, partial(_build_timm, arch)


def _build_timm(arch: str, num_classes: int) -> nn.Module:
    return import_timm().create_model(arch, pretrained=False, num_classes=num_classes)
