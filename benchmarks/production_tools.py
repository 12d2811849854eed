"""dfq against a production tool's no-data option, on the same real images, in one process.

For each model: P exported to float ONNX, then
- OpenVINO NNCF (``nncf.quantize`` on the ONNX model, its default INT8 preset) calibrated on 300 inputs with no data
  behind them: standard-normal noise in the model's input space (NNCF's and ONNX Runtime's documented stand-in) and
  uniformly random pixels put through the model's preprocessing (the fairest noise: the input range is right);
- Qualcomm AIMET (``aimet-torch``): cross-layer equalization, then its quantization simulation (per-channel weights,
  ``post_training_tf_enhanced`` ranges) calibrated on the uniform-pixel noise, at W8A8, W4A8 and W4A4 (its simulated
  accuracy, evaluated in PyTorch: AIMET's no-data recipe, the one production tool here with sub-8-bit settings);
- dfq data-free at W8A8 (``zeroq``, deploy protocol) and at 4 bits (``recon``), for which NNCF has no counterpart (its
  post-training quantization of convolutions is INT8 only);
each evaluated on the real set with ONNX Runtime (NNCF's models, dfq's export) and PyTorch (dfq's Q), top-1 beside
the full-precision model's.

Needs `pip install nncf openvino` (and `aimet-torch` for --aimet); none of them replaces torch.
Usage: python benchmarks/production_tools.py [--only resnet8|lite0|resnet20] [--lite0-samples 8 --lite0-steps 25]
       [--no-4bit] [--aimet]
Writes benchmarks/results/production_tools.json after each model, keeping the rows of models it does not redo.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import IMAGENET, LITE0, LOSSLESS, RESULTS, SHARED_DATA, WEIGHTS, command, write_result

import dfq
from dfq.compat import import_torchvision
from dfq.data import open_dataset
from dfq.data.loader import make_loader
from dfq.evaluate import evaluate
from dfq.export.runtime import OnnxClassifier
from dfq.models import create_model

MODELS = {
    "resnet8": ("resnet8_mlperf_cifar10", SHARED_DATA / "resnet8-mlperf-tiny-54f3da95.pt", LOSSLESS),
    "resnet20": ("resnet20a_cifar10", WEIGHTS, LOSSLESS),
    "lite0": ("efficientnet_lite0", LITE0,
              IMAGENET),
}  # fmt: skip
CALIBRATION = 300


def noise_inputs(info, kind: str, n: int) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    shape = (n, *info.input_size)
    if kind == "gaussian":
        return torch.randn(shape, generator=g).numpy()
    pixels = torch.randint(0, 256, shape, generator=g).float() / 255
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (info.mean, info.std))
    return ((pixels - mean) / std).numpy()


def nncf_row(fp_onnx: Path, info, kind: str, loader: list, tmp: Path) -> dict:
    import nncf
    import onnx

    model = onnx.load(fp_onnx)
    name = model.graph.input[0].name
    calib = noise_inputs(info, kind, CALIBRATION)
    t = time.perf_counter()
    quantized = nncf.quantize(model, nncf.Dataset(list(calib), lambda x: {name: x[None]}), subset_size=CALIBRATION)
    seconds = round(time.perf_counter() - t, 1)
    out = tmp / f"nncf-{kind}.onnx"
    onnx.save(quantized, out)
    return {"tool": f"NNCF {nncf.__version__}", "calibration": f"{CALIBRATION} {kind} inputs", "quant": "INT8",
            "seconds": seconds, "top1": evaluate(OnnxClassifier(out), loader, progress=False)["top1"],
            "runtime": "onnxruntime"}  # fmt: skip


def aimet_row(p, info, wbits: int, abits: int, loader: list) -> dict:
    import_torchvision()  # aimet-torch imports torchvision (a CUDA wheel beside the CPU torch here)
    import aimet_torch
    from aimet_torch.cross_layer_equalization import equalize_model
    from aimet_torch.nn import QuantizationMixin
    from aimet_torch.quantsim import QuantizationSimModel

    model = copy.deepcopy(p).eval()
    for m in model.modules():  # a model's own parameter-free leaves (ResNet-20's PadShortcut): left unquantized
        if not type(m).__module__.startswith("torch.nn") and not any(True for _ in m.children()):
            QuantizationMixin.ignore(type(m))
    dummy = torch.zeros(1, *info.input_size)
    calib = torch.from_numpy(noise_inputs(info, "uniform-pixels", CALIBRATION))
    config = Path(aimet_torch.__file__).parent / "common" / "quantsim_config" / "default_config_per_channel.json"
    t = time.perf_counter()
    equalize_model(model, dummy_input=dummy)
    sim = QuantizationSimModel(model, dummy, quant_scheme="tf_enhanced", default_output_bw=abits,
                               default_param_bw=wbits, config_file=str(config))  # fmt: skip
    with torch.no_grad():
        sim.compute_encodings(lambda m, _: [m(b) for b in calib.split(50)], None)
    seconds = round(time.perf_counter() - t, 1)
    return {
        "tool": f"AIMET {aimet_torch.__version__} CLE",
        "calibration": f"{CALIBRATION} uniform-pixels inputs",
        "quant": f"W{wbits}A{abits} (simulated)",
        "seconds": seconds,
        "top1": evaluate(sim.model.eval(), loader, progress=False)["top1"],
        "runtime": "pytorch (simulated)",
    }


def dfq_row(p, bits: int, abits: int, method, loader: list, tmp: Path) -> dict:
    t = time.perf_counter()
    result = dfq.quantize(p, dfq.QuantConfig(wbits=bits, abits=abits, protocol="deploy"), method, seed=0,
                          progress=False)  # fmt: skip
    seconds = round(time.perf_counter() - t, 1)
    exported = dfq.export_onnx(result, tmp / f"dfq-w{bits}a{abits}.onnx")
    return {
        "tool": f"dfq {dfq.__version__} {result.method_name}",
        "calibration": "data-free (synthetic images)",
        "quant": f"W{bits}A{abits} deploy",
        "seconds": seconds,
        "top1": evaluate(OnnxClassifier(exported["out"]), loader, progress=False)["top1"],
        "top1_pytorch": evaluate(result.model.eval(), loader, progress=False)["top1"],
        "runtime": "onnxruntime",
    }


def run_model(key: str, args: argparse.Namespace, tmp: Path) -> dict:
    name, weights, data = MODELS[key]
    p = create_model(name, weights=weights).eval()
    info = p.dfq_info
    loader = list(make_loader(open_dataset(data), info.mean, info.std, batch_size=50))
    fp_onnx = dfq.export_onnx(p, tmp / f"{key}-fp.onnx")["out"]
    rows = [{"tool": "full precision", "top1": evaluate(OnnxClassifier(fp_onnx), loader, progress=False)["top1"],
             "runtime": "onnxruntime"}]  # fmt: skip
    for kind in ("gaussian", "uniform-pixels"):
        rows.append(nncf_row(fp_onnx, info, kind, loader, tmp))
        print(rows[-1], flush=True)
    for wbits, abits in ((8, 8), (4, 8), (4, 4)) if args.aimet else ():
        rows.append(aimet_row(p, info, wbits, abits, loader))
        print(rows[-1], flush=True)
    lite = key == "lite0"
    zq = dfq.methods.ZeroQConfig(num_samples=args.lite0_samples, steps=args.lite0_steps) if lite else \
        dfq.methods.ZeroQConfig()  # fmt: skip
    settings = [(8, 8, zq)] + ([] if args.no_4bit else [(4, 8 if lite else 4, dfq.methods.ReconConfig())])
    for bits, abits, method in settings:
        rows.append(dfq_row(p, bits, abits, method, loader, tmp))
        print(rows[-1], flush=True)
    return {"model": name, "data": data.name, "images": sum(len(y) for _, y in loader), "rows": rows,
            "command": command()}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(MODELS))
    parser.add_argument("--lite0-samples", type=int, default=8)
    parser.add_argument("--lite0-steps", type=int, default=25)
    parser.add_argument("--no-4bit", action="store_true", help="skip the 4-bit dfq rows (the slow ones)")
    parser.add_argument("--aimet", action="store_true", help="add AIMET's rows (pip install aimet-torch)")
    args = parser.parse_args()
    keys = [args.only] if args.only else list(MODELS)
    previous = RESULTS / "production_tools.json"
    models = [m for m in json.loads(previous.read_text())["models"] if m["model"] not in {MODELS[k][0] for k in keys}] \
        if previous.is_file() else []  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for key in keys:
            models.append(run_model(key, args, Path(tmp)))
            write_result("production_tools", {"torch_threads": torch.get_num_threads(), "models": models})
    return 0


if __name__ == "__main__":
    sys.exit(main())
