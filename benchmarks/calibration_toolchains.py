"""dfq's synthetic images as calibration data for other toolchains, against noise and real images, W8A8.

For each model (``resnet20a_cifar10`` on the 4-class lossless set, EfficientNet-Lite0 on the 1,000 ImageNet photos)
the real set is split into two halves (even and odd positions). Every row is evaluated on the odd half; only the
real-image row calibrates, on the even half. P is exported to FP32 ONNX and quantized to INT8 by
- ONNX Runtime's ``quantize_static`` (QDQ, per-channel weights, its default MinMax calibration), and
- OpenVINO NNCF's ``nncf.quantize`` (its default preset),
each calibrated on N inputs of three kinds: dfq's synthetic pool (``dfq.synthesize``, the decoder synthesizer; the
time it took is reported), standard-normal noise in the model's input space (the toolchains' documented stand-in
for missing data), and N real images from the even half. dfq's own W8A8 model (``zeroq``, deploy protocol) exported
to ONNX is evaluated beside them; every model runs on ONNX Runtime.

Needs `pip install nncf openvino` beside dfq[export].
Usage: python benchmarks/calibration_toolchains.py [--only resnet20|lite0] [--num N] [--steps S]
Writes benchmarks/results/calibration_toolchains.json after each model, keeping the rows of models it does not redo.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import IMAGENET, LITE0, LOSSLESS, WEIGHTS, command, run_models

import dfq
from dfq.data import make_loader, open_dataset
from dfq.export.runtime import runner
from dfq.models import create_model

MODELS = {
    "resnet20": ("resnet20a_cifar10", WEIGHTS, LOSSLESS, 300, 150),
    "lite0": ("efficientnet_lite0", LITE0,
              IMAGENET, 128, 60),
}  # fmt: skip


def top1(path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    run = runner(path)
    preds = np.concatenate([next(iter(run(images[i : i + 50]).values())).argmax(1) for i in range(0, len(images), 50)])
    return round(100.0 * float((preds == labels).mean()), 3)


def ort_quantize(fp: Path, out: Path, calib: np.ndarray) -> Path:
    from onnxruntime.quantization import QuantFormat, quantize_static

    reader = dfq.calibration.onnxruntime_reader(calib, "input", batch_size=1)
    quantize_static(fp, out, reader, quant_format=QuantFormat.QDQ, per_channel=True)
    return out


def nncf_quantize(fp: Path, out: Path, calib: np.ndarray) -> Path:
    import nncf
    import onnx

    quantized = nncf.quantize(onnx.load(fp), dfq.calibration.nncf_dataset(calib, "input"), subset_size=len(calib))
    onnx.save(quantized, out)
    return out


def run_model(key: str, args: argparse.Namespace, tmp: Path) -> dict:
    import nncf
    import onnxruntime

    name, weights, data, num, steps = MODELS[key]
    num, steps = args.num or num, args.steps or steps
    p = create_model(name, weights=weights).eval()
    info = p.dfq_info
    xs, ys = zip(*make_loader(open_dataset(data), info.mean, info.std, batch_size=100), strict=True)
    images, labels = torch.cat(xs).numpy(), torch.cat(ys).numpy()
    calib_half, eval_images, eval_labels = images[0::2], images[1::2], labels[1::2]
    fp = Path(dfq.export_onnx(p, tmp / "fp32.onnx")["out"])
    t = time.perf_counter()
    pool = dfq.synthesize(p, num, steps=steps, progress=False).numpy()
    synth_s = round(time.perf_counter() - t, 1)
    sources = {
        f"dfq synthetic ({num}, {steps} steps, {synth_s} s)": pool,
        f"Gaussian noise ({num})": np.random.default_rng(0).standard_normal(pool.shape, dtype=np.float32),
        f"real images ({num}, other half)": calib_half[:num],
    }
    rows = [{"tool": "full precision", "top1": top1(fp, eval_images, eval_labels)}]
    tools = {f"ONNX Runtime {onnxruntime.__version__} quantize_static": ort_quantize,
             f"NNCF {nncf.__version__}": nncf_quantize}  # fmt: skip
    for tool, quantize in tools.items():
        for i, (source, calib) in enumerate(sources.items()):
            t = time.perf_counter()
            out = quantize(fp, tmp / f"{len(rows)}-{i}.onnx", calib)
            rows.append({"tool": tool, "calibration": source, "seconds": round(time.perf_counter() - t, 1),
                         "top1": top1(out, eval_images, eval_labels)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    t = time.perf_counter()
    zq = dfq.methods.ZeroQConfig(num_samples=8, steps=25) if key == "lite0" else dfq.methods.ZeroQConfig()
    result = dfq.quantize(p, dfq.QuantConfig(wbits=8, abits=8), zq, seed=0, progress=False)
    seconds = round(time.perf_counter() - t, 1)
    out = Path(dfq.export_onnx(result, tmp / "dfq.onnx")["out"])
    rows.append({"tool": f"dfq {dfq.__version__} zeroq W8A8 deploy", "calibration": "data-free",
                 "seconds": seconds, "top1": top1(out, eval_images, eval_labels)})  # fmt: skip
    print(json.dumps(rows[-1]), flush=True)
    lo, hi = float(pool.min()), float(pool.max())
    return {"model": name, "data": data.name, "eval_images": len(eval_labels), "calibration_inputs": num,
            "pool_range": [round(lo, 3), round(hi, 3)], "valid_range": [round(v, 3) for v in info.input_range()],
            "rows": rows, "command": command()}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(MODELS))
    parser.add_argument("--num", type=int, help="calibration inputs of each kind (default 300 / 128)")
    parser.add_argument("--steps", type=int, help="synthesis steps (default 150 / 60)")
    args = parser.parse_args()
    keys = [args.only] if args.only else list(MODELS)
    run_models("calibration_toolchains", keys, lambda key, tmp: run_model(key, args, tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
