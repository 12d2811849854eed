"""dfq's exports on two runtimes, ONNX Runtime and OpenVINO, in one process: speed, accuracy, parity, file sizes.

For each model (``resnet20a_cifar10`` on the 4-class lossless set, EfficientNet-Lite0 on the 1,000 ImageNet photos):
- P exported to FP32 ONNX, and Q (``zeroq`` W8A8, deploy protocol) exported to INT8 ONNX;
- each file on each runtime (``--threads`` threads; OpenVINO at f32 inference precision, not its bf16 default):
  median latency at batch 1 and batch 64 and throughput at batch 64, top-1 on the real set, and the share of images
  on which the two runtimes predict the same class (and each agrees with the PyTorch Q);
- what each runtime executes for Q: ONNX Runtime's fused operators (QLinearConv, ...) and OpenVINO's layer
  precisions (Convolution:u8, ...);
- Q exported with 8-, 4- and 2-bit weights (W8A8, W4A8, W2A8; a short ``zeroq`` calibration, as only sizes and
  kernels are measured), in every weight storage: file size, the kernels each runtime executes, and batch-64
  latency of the packed files.

Needs `pip install openvino` beside dfq[export].
Usage: python benchmarks/runtimes.py [--only resnet20|lite0] [--threads 2] [--lite0-samples 8 --lite0-steps 25]
Writes benchmarks/results/runtimes.json after each model, keeping the rows of models it does not redo.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import IMAGENET, LITE0, LOSSLESS, WEIGHTS, command, run_models

import dfq
from dfq.bench import wall_times
from dfq.data import make_loader, open_dataset
from dfq.errors import DFQError
from dfq.export.openvino import compile_model, executed_precisions
from dfq.export.runtime import INTEGER_OPS, RUNTIMES, optimized_op_counts, runner
from dfq.models import create_model

MODELS = {
    "resnet20": ("resnet20a_cifar10", WEIGHTS, LOSSLESS),
    "lite0": ("efficientnet_lite0", LITE0,
              IMAGENET),
}  # fmt: skip


def timed(run, x: np.ndarray, repeats: int) -> float:
    """Median wall time of ``run(x)`` in ms, after warm-up runs."""
    return 1000 * statistics.median(wall_times(lambda: run(x), repeats, warmup=5))


def predictions(run, batches: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([next(iter(run(x).values())).argmax(1) for x in batches])


def speed(run, shape: tuple[int, ...], repeats: int) -> dict:
    x1 = np.random.default_rng(0).standard_normal((1, *shape), dtype=np.float32)
    x64 = np.random.default_rng(1).standard_normal((64, *shape), dtype=np.float32)
    ms1, ms64 = timed(run, x1, repeats * 4), timed(run, x64, repeats)
    return {"latency_ms_batch1": round(ms1, 3), "latency_ms_batch64": round(ms64, 2),
            "images_per_s_batch64": round(64_000 / ms64, 1)}  # fmt: skip


def kernels(path: Path) -> dict:
    ops = optimized_op_counts(path)
    return {"onnxruntime": {k: v for k, v in ops.items() if k in INTEGER_OPS or k in ("Conv", "FusedConv", "Gemm")},
            "openvino": executed_precisions(compile_model(path))}  # fmt: skip


def runtime_rows(files: dict[str, Path], shape, batches, labels, q_preds, threads: int, repeats: int) -> list[dict]:
    rows = []
    for variant, path in files.items():
        preds = {}
        for rt in RUNTIMES:
            run = runner(path, rt, threads=threads)
            preds[rt] = predictions(run, batches)
            rows.append({"model_file": variant, "runtime": rt, **speed(run, shape, repeats),
                         "top1": round(100.0 * float((preds[rt] == labels).mean()), 3)})  # fmt: skip
            if variant == "int8" and q_preds is not None:
                rows[-1]["agreement_with_pytorch_q"] = round(100.0 * float((preds[rt] == q_preds).mean()), 3)
            print(json.dumps(rows[-1]), flush=True)
        same = float((preds["onnxruntime"] == preds["openvino"]).mean())
        rows[-1]["agreement_between_runtimes"] = round(100.0 * same, 3)
    return rows


def storage_rows(p, shape, threads: int, repeats: int, tmp: Path) -> list[dict]:
    """File sizes and kernels only: a short ZeroQ calibration is enough (the codes' values do not matter here)."""
    rows, short = [], dfq.methods.ZeroQConfig(num_samples=8, steps=20)
    for wbits in (8, 4, 2):
        result = dfq.quantize(p, dfq.QuantConfig(wbits=wbits, abits=8), short, seed=0, progress=False)
        for storage in ("packed", "int4", "int8") if wbits < 8 else ("packed",):
            path = tmp / f"w{wbits}-{storage}.onnx"
            out = dfq.export_onnx(result, path, weight_storage=storage)
            row = {"weights": f"W{wbits}A8", "storage": storage, "bytes": out["bytes"],
                   "onnxruntime_kernels": out["integer_ops"]}  # fmt: skip
            try:
                row["openvino_kernels"] = executed_precisions(compile_model(path))
            except DFQError as e:
                row["openvino_kernels"] = f"refused: {e}"
            if storage == "packed":
                for rt in RUNTIMES:
                    try:
                        run = runner(path, rt, threads=threads)
                    except DFQError:
                        continue
                    x = np.random.default_rng(1).standard_normal((64, *shape), dtype=np.float32)
                    row[f"{rt}_latency_ms_batch64"] = round(timed(run, x, repeats), 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def run_model(key: str, args: argparse.Namespace, tmp: Path) -> dict:
    name, weights, data = MODELS[key]
    p = create_model(name, weights=weights).eval()
    info = p.dfq_info
    shape = tuple(info.input_size)
    loader = list(make_loader(open_dataset(data), info.mean, info.std, batch_size=50))
    batches = [x.numpy() for x, _ in loader]
    labels = torch.cat([y for _, y in loader]).numpy()
    lite = key == "lite0"
    zq = dfq.methods.ZeroQConfig(num_samples=args.lite0_samples, steps=args.lite0_steps) if lite else \
        dfq.methods.ZeroQConfig()  # fmt: skip
    t = time.perf_counter()
    result = dfq.quantize(p, dfq.QuantConfig(wbits=8, abits=8), zq, seed=0, progress=False)
    data_free_s = round(time.perf_counter() - t, 1)
    files = {"fp32": dfq.export_onnx(p, tmp / "fp32.onnx")["out"], "int8": dfq.export_onnx(result, tmp / "int8.onnx")}
    files["int8"] = files["int8"]["out"]
    with torch.inference_mode():
        q_preds = np.concatenate([result.model(torch.from_numpy(x)).argmax(1).numpy() for x in batches])
    rows = runtime_rows({k: Path(v) for k, v in files.items()}, shape, batches, labels, q_preds, args.threads,
                        args.repeats)  # fmt: skip
    return {
        "model": name,
        "data": data.name,
        "images": len(labels),
        "threads": args.threads,
        "method": f"zeroq W8A8 deploy ({zq.num_samples} images x {zq.steps} steps)",
        "data_free_seconds": data_free_s,
        "top1_pytorch_q": round(100.0 * float((q_preds == labels).mean()), 3),
        "int8_kernels": kernels(Path(files["int8"])),
        "rows": rows,
        "weight_storage": storage_rows(p, shape, args.threads, args.repeats, tmp),
        "command": command(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20, help="timed runs at batch 64 (4x as many at batch 1)")
    parser.add_argument("--lite0-samples", type=int, default=8)
    parser.add_argument("--lite0-steps", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run_models("runtimes", [args.only] if args.only else list(MODELS), lambda key, tmp: run_model(key, args, tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
