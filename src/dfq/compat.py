"""Optional third-party model libraries (torchvision, timm), imported on demand.

dfq depends on neither: they only supply architectures for ``tv:NAME`` and
``timm:NAME`` model names. Install them beside an existing torch with
``pip install --no-deps torchvision timm`` (with dependencies, pip may replace a
CPU torch by a multi-GB CUDA build); timm builds its models without its hub dependencies
(huggingface_hub, safetensors), which only fetch published weights.
"""

from __future__ import annotations

import importlib
import re
import sys
from types import ModuleType

import torch

from dfq.errors import DFQError

__all__ = ["import_timm", "import_torchvision"]

# Keeps the operator schemas defined by _define_torchvision_ops alive (a Library deregisters when collected).
_STUB_LIBRARY: torch.library.Library | None = None


def _torchvision_spec() -> str:
    """The torchvision release built against this torch (torch 2.N pairs with torchvision 0.(N+15))."""
    m = re.match(r"2\.(\d+)\.", torch.__version__)
    return f"torchvision==0.{int(m[1]) + 15}.*" if m else "torchvision"


def _missing(what: str, error: ImportError, packages: str) -> DFQError:
    return DFQError(f"{what} is not installed ({error}); install it with: pip install --no-deps {packages}")


def import_torchvision() -> ModuleType:
    """``import torchvision``, also where its compiled operators cannot load.

    PyPI's torchvision wheels are CUDA builds; beside a CPU torch their ``_C``
    extension fails to load, so ``torchvision::nms`` is never defined and the
    import dies registering a fake kernel for it ("operator torchvision::nms does
    not exist"). The model definitions need none of these operators, so on that
    one error we define the two schemas it registers against and import again;
    the detection operators (nms, roi_align...) stay unusable, the models work.
    """
    try:
        return _import_torchvision()
    except ImportError as e:
        raise _missing("torchvision", e, _torchvision_spec()) from e


def import_timm() -> ModuleType:
    """``import timm``; timm imports torchvision, which needs :func:`import_torchvision`'s workaround first."""
    try:
        _import_torchvision()
    except ImportError as e:
        raise _missing("timm needs torchvision, which", e, f"{_torchvision_spec()} timm") from e
    try:
        return importlib.import_module("timm")
    except ImportError as e:
        raise _missing("timm", e, f"{_torchvision_spec()} timm") from e


def _import_torchvision() -> ModuleType:
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as e:
        if "torchvision::nms does not exist" not in str(e):
            raise
    _define_torchvision_ops()
    for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[mod]  # the failed import left half-initialised modules behind
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as e:  # another operator missing: a torchvision built for a different torch
        raise DFQError(
            f"torchvision cannot be imported beside torch {torch.__version__} ({e}); install the release built "
            f"for it: pip install --no-deps {_torchvision_spec()}"
        ) from e


def _define_torchvision_ops() -> None:
    global _STUB_LIBRARY
    if _STUB_LIBRARY is None:
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _STUB_LIBRARY = lib
