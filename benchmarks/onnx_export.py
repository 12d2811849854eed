"""Exported models on ONNX Runtime: parity with PyTorch, latency, size, and proof of integer kernels.

For each deploy-protocol run directory: export it to ONNX, evaluate the PyTorch quantized
model and the ONNX model on both test sets, count top-1 agreement image by image, and
time ONNX Runtime (CPU execution provider, --threads threads) at batch 1 and batch 64
against the FP32 ONNX export of the full-precision model, in one process. The operator
counts of the graph ONNX Runtime executes (after its fusions) show which kernels ran.

Usage: python benchmarks/onnx_export.py runs/deploy/zeroq-w8a8 runs/deploy/adadfq-w4a4 ... [--threads 2]
Writes benchmarks/results/onnx_export.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from _common import ROOT, SHARED_DATA, TEST_SETS, WEIGHTS, write_result

from dfq.bench import wall_times
from dfq.data import make_loader, open_dataset
from dfq.export.api import export, load_target
from dfq.export.runtime import INTEGER_OPS, OnnxClassifier, optimized_op_counts, runner


@torch.inference_mode()
def predictions(model: torch.nn.Module, loader) -> tuple[np.ndarray, np.ndarray]:
    preds, labels = [], []
    for x, y in loader:
        preds.append(model(x).argmax(1).numpy())
        labels.append(y.numpy())
    return np.concatenate(preds), np.concatenate(labels)


def parity(q: torch.nn.Module, onnx_model: OnnxClassifier) -> dict:
    info = q.dfq_info
    out = {}
    for name, path in TEST_SETS.items():
        loader = list(make_loader(open_dataset(path, image_size=32), info.mean, info.std, batch_size=500))
        p_torch, labels = predictions(q, loader)
        p_onnx, _ = predictions(onnx_model, loader)
        out[name] = {
            "images": len(labels),
            "top1_pytorch": round(100.0 * float((p_torch == labels).mean()), 3),
            "top1_onnx": round(100.0 * float((p_onnx == labels).mean()), 3),
            "top1_agreement": round(100.0 * float((p_torch == p_onnx).mean()), 3),
        }
    return out


def latency(path: Path, threads: int, batch: int, repeats: int) -> dict:
    run = runner(path, threads=threads)
    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32), dtype=np.float32)
    times = wall_times(lambda: run(x), repeats, warmup=10)
    median = statistics.median(times)
    return {"batch": batch, "ms_median": round(1e3 * median, 3), "ms_min": round(1e3 * min(times), 3),
            "images_per_s": round(batch / median, 1), "repeats": repeats}  # fmt: skip


def speedups(quantized: list[dict], fp32: list[dict]) -> dict[str, float]:
    """FP32 median latency over quantized median latency, per batch size."""
    pairs = zip(quantized, fp32, strict=True)
    return {f"batch{q['batch']}": round(f["ms_median"] / q["ms_median"], 3) for q, f in pairs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "onnx")
    args = parser.parse_args()
    if not all(p.is_file() for p in (WEIGHTS, *TEST_SETS.values())):
        print(f"skipped: the shared data is not in {SHARED_DATA}", file=sys.stderr)
        return 0
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    fp_model, fp_meta = load_target("resnet20a_cifar10", str(WEIGHTS))
    fp_path = args.out_dir / "resnet20a_cifar10-fp32.onnx"
    export(fp_model, fp_path, fp_meta)
    fp = {"file": fp_path.name, "bytes": fp_path.stat().st_size,
          "latency": [latency(fp_path, args.threads, b, r) for b, r in ((1, 300), (64, 50))]}  # fmt: skip

    rows = []
    for run in args.runs:
        q, meta = load_target(run)
        path = args.out_dir / f"{run.name}.onnx"
        exported = export(q, path, meta)
        ops = optimized_op_counts(path)
        lat = [latency(path, args.threads, b, r) for b, r in ((1, 300), (64, 50))]
        row = {
            "run": str(run),
            "method": meta["method"],
            "wbits": meta["wbits"],
            "abits": meta["abits"],
            "file": path.name,
            "bytes": exported["bytes"],
            "size_ratio_vs_fp32": round(exported["bytes"] / fp["bytes"], 3),
            "executed_ops": ops,
            "integer_ops": {k: v for k, v in ops.items() if k in INTEGER_OPS},
            "parity": parity(q, OnnxClassifier(path, threads=args.threads)),
            "latency": lat,
            "speedup_vs_fp32": speedups(lat, fp["latency"]),
        }
        rows.append(row)
        print(f"{run.name}: {row['parity']} speed-up {row['speedup_vs_fp32']} ops {row['integer_ops']}")
    out = write_result("onnx_export", {"threads": args.threads, "fp32": fp, "runs": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
