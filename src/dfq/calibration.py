"""Synthetic calibration data for other toolchains: dfq's pool file, read back and served through their interfaces.

Post-training quantizers (ONNX Runtime's ``quantize_static``, OpenVINO NNCF, torchao PT2E, ...) need a few hundred
inputs to observe activation ranges; without data their fallback is random noise, which calibrates the wrong ranges.
``dfq synthesize MODEL --out pool.npz`` (or :func:`dfq.synthesize`) writes images synthesized from the model's own
BatchNorm statistics, in its normalised input space and, for a model whose preprocessing dfq knows, within the range
real images span there. The adapters below feed such a pool to ONNX Runtime and NNCF::

    pool = dfq.calibration.load_pool("pool.npz")
    quantize_static("fp.onnx", "int8.onnx", dfq.calibration.onnxruntime_reader(pool, "input"))
    nncf.quantize(onnx_model, dfq.calibration.nncf_dataset(pool, "input"), subset_size=len(pool))
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dfq.errors import DFQError

__all__ = ["load_pool", "nncf_dataset", "onnxruntime_reader", "pool_batches"]


def load_pool(path: str | Path) -> np.ndarray:
    """The float32 NCHW images of a pool written by ``dfq synthesize`` (``.npz`` or ``.npy``)."""
    path = Path(path)
    if not path.is_file():
        raise DFQError(f"synthetic pool not found: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError):
        raise DFQError(f"{path} is not a dfq synthetic pool (not a NumPy .npz or .npy file)") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            images = loaded["images"] if "images" in loaded.files else None
    else:
        images = loaded
    if images is None or images.ndim != 4 or not np.issubdtype(images.dtype, np.floating):
        raise DFQError(f"{path} is not a dfq synthetic pool (float N×C×H×W 'images')")
    return np.ascontiguousarray(images, dtype=np.float32)


def pool_batches(pool: np.ndarray | torch.Tensor, batch_size: int = 1) -> list[np.ndarray]:
    """The pool as float32 NCHW batches of ``batch_size`` (the last one may be smaller)."""
    array = pool.detach().cpu().numpy() if isinstance(pool, torch.Tensor) else np.asarray(pool)
    if batch_size < 1:
        raise DFQError(f"batch_size must be >= 1, got {batch_size}")
    array = array.astype(np.float32, copy=False)
    return [array[i : i + batch_size] for i in range(0, len(array), batch_size)]


def onnxruntime_reader(pool: np.ndarray | torch.Tensor, input_name: str, batch_size: int = 1) -> Any:
    """An ``onnxruntime.quantization.CalibrationDataReader`` serving the pool (rewindable, as ONNX Runtime's
    calibrators that take several passes need)."""
    try:
        from onnxruntime.quantization import CalibrationDataReader
    except ImportError:
        raise DFQError("the ONNX Runtime adapter needs onnxruntime: pip install 'dfq[export]'") from None
    batches = pool_batches(pool, batch_size)

    class PoolReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.served = 0
            self._it: Iterator[np.ndarray] = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._it, None)
            self.served += batch is not None
            return None if batch is None else {input_name: batch}

        def rewind(self) -> None:
            self._it = iter(batches)

        def __len__(self) -> int:
            return len(batches)

    return PoolReader()


def nncf_dataset(pool: np.ndarray | torch.Tensor, input_name: str | None = None, batch_size: int = 1) -> Any:
    """An ``nncf.Dataset`` of the pool: items ``{input_name: batch}`` for an ONNX model, plain batches (an
    OpenVINO or PyTorch model's input; tensors for PyTorch: pass ``torch.from_numpy`` as NNCF's transform) without
    ``input_name``."""
    try:
        import nncf
    except ImportError:
        raise DFQError("the NNCF adapter needs nncf: pip install nncf") from None
    batches = pool_batches(pool, batch_size)
    return nncf.Dataset(batches, (lambda b: {input_name: b}) if input_name else None)
