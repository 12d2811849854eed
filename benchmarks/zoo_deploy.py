"""The two newest zoo models under the deploy protocol: PyTorch Q against its ONNX Runtime export, on real images.

For each setting: quantize data-free (``dfq.quantize`` under ``QuantConfig(protocol="deploy")``, seed 0), export
with a site-by-site parity check on real images (``dfq.export_onnx(..., verify=...)``), then evaluate the
full-precision model P, the PyTorch Q and the ONNX Runtime model on the whole real set, with top-1 agreement
image by image (Q with P, ONNX with Q). EfficientNet-Lite0's ZeroQ settings are cut to fit about ten minutes on a
2-core CPU (one Adam step on 32 images at 224x224 takes ~18 s there); they are recorded with the results.

Usage: python benchmarks/zoo_deploy.py [--only resnet8|lite0|lite0-recon] [--lite0-samples 16] [--lite0-steps 50]
       [--recon KEY=VALUE ...] [--abits 8]   (lite0-recon: recon W4A<abits> with these ReconConfig settings)
Writes benchmarks/results/zoo_deploy.json after each setting (so a cut run keeps what finished), keeping the
rows of settings this run does not redo.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from _common import IMAGENET, LITE0, RESULTS, SHARED_DATA, write_result
from torch import nn

import dfq
from dfq.data import open_dataset
from dfq.data.loader import make_loader
from dfq.evaluate import evaluate
from dfq.export.runtime import OnnxClassifier
from dfq.models import create_model

MODELS = {
    "resnet8": ("resnet8_mlperf_cifar10", SHARED_DATA / "resnet8-mlperf-tiny-54f3da95.pt",
                SHARED_DATA / "cifar10-test-4class-lossless.npz"),
    "lite0": ("efficientnet_lite0", LITE0,
              IMAGENET),
}  # fmt: skip


class _Recorder(nn.Module):
    """``model`` behind evaluate's interface, keeping its top-1 predictions for agreement counts."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.preds = model, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        self.preds.append(out.argmax(1))
        return out


@torch.inference_mode()
def top1(model: nn.Module, loader: list, desc: str) -> tuple[float, torch.Tensor, float]:
    rec = _Recorder(model)
    t = time.perf_counter()
    metrics = evaluate(rec, loader, progress=False, desc=desc)
    return round(float(metrics["top1"]), 3), torch.cat(rec.preds), round(time.perf_counter() - t, 1)


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(100.0 * float((a == b).float().mean()), 3)


def run_setting(key: str, bits: int, abits: int, method, verify_images: int, tmp: Path, ends: int | None) -> dict:
    name, weights, data = MODELS[key]
    p = create_model(name, weights=weights).eval()
    info = p.dfq_info
    loader = list(make_loader(open_dataset(data), info.mean, info.std, batch_size=50))
    t = time.perf_counter()
    quant = dfq.QuantConfig(wbits=bits, abits=abits, protocol="deploy", ends_bits=ends)
    result = dfq.quantize(p, quant, method, seed=0,
                          progress=False)  # fmt: skip
    data_free_s = round(time.perf_counter() - t, 1)
    verify_batches = list(torch.cat([x for x, _ in loader])[:verify_images].split(16))
    exported = dfq.export_onnx(result, tmp / f"{key}-w{bits}a{abits}.onnx", verify=verify_batches)
    parity = exported.pop("verify")
    fp_top1, fp_preds, _ = top1(p, loader, "fp")
    q_top1, q_preds, q_s = top1(result.model.eval(), loader, "q")
    onnx_top1, onnx_preds, onnx_s = top1(OnnxClassifier(exported["out"]), loader, "onnx")
    worst = max(parity["sites"], key=lambda s: s["max_lsb"])
    return {
        "model": name, "weights": weights.name, "data": data.name, "images": len(fp_preds),
        "quant": f"W{bits}A{abits} deploy" + (f", ends {ends}-bit" if ends else ""), "method": result.method_name,
        "method_config": dataclasses.asdict(result.method), "data_free_seconds": data_free_s,
        "top1_fp": fp_top1, "top1_q_pytorch": q_top1, "top1_q_onnx": onnx_top1,
        "agreement_q_with_fp": agreement(q_preds, fp_preds), "agreement_onnx_with_q": agreement(onnx_preds, q_preds),
        "agreement_onnx_with_fp": agreement(onnx_preds, fp_preds),
        "eval_seconds": {"q_pytorch": q_s, "onnx": onnx_s},
        "export": {k: v for k, v in exported.items() if k != "out"},
        "verify": {"images": parity["images"], "top1_agreement": parity["top1_agreement"],
                   "logits_max_abs_error": parity["logits_max_abs_error"], "sites": len(parity["sites"]),
                   "sites_over_1_lsb": sum(s["max_lsb"] > 1.0 + 1e-3 for s in parity["sites"]),
                   "worst_site": worst},
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=[*sorted(MODELS), "lite0-recon"])
    parser.add_argument("--recon", nargs="*", default=[], help="ReconConfig KEY=VALUE settings for lite0-recon")
    parser.add_argument("--abits", type=int, default=8, help="activation bits of lite0-recon (weights: 4)")
    parser.add_argument("--ends-bits", type=int, help="lite0-recon: first and last layers at these bits")
    parser.add_argument("--lite0-samples", type=int, default=16)
    parser.add_argument("--lite0-steps", type=int, default=50)
    args = parser.parse_args()
    settings = []
    if args.only in (None, "resnet8"):
        settings += [("resnet8", 8, 8, dfq.methods.ZeroQConfig(), 64), ("resnet8", 4, 4, dfq.methods.ReconConfig(), 64)]
    if args.only in (None, "lite0"):
        zq = dfq.methods.ZeroQConfig(num_samples=args.lite0_samples, steps=args.lite0_steps)
        settings.append(("lite0", 8, 8, zq, 16))
    if args.only == "lite0-recon":
        recon = dfq.methods.ReconConfig(**{k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.recon)})
        settings.append(("lite0", 4, args.abits, recon, 16))
    previous = RESULTS / "zoo_deploy.json"
    suffix = f", ends {args.ends_bits}-bit" if args.ends_bits and args.only == "lite0-recon" else ""
    redo = {(MODELS[key][0], f"W{bits}A{abits} deploy{suffix}") for key, bits, abits, _, _ in settings}
    rows = [r for r in json.loads(previous.read_text())["rows"] if (r["model"], r["quant"]) not in redo] \
        if previous.is_file() else []  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for key, bits, abits, method, n_verify in settings:
            print(f"{key} W{bits}A{abits} {type(method).__name__}", flush=True)
            row = run_setting(key, bits, abits, method, n_verify, Path(tmp), args.ends_bits if suffix else None)
            row["command"] = " ".join([Path(sys.executable).name, *sys.argv])
            rows.append(row)
            print(row, flush=True)
            write_result("zoo_deploy", {"torch_threads": torch.get_num_threads(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
