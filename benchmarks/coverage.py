"""Architecture coverage at random weights: what works today, model by model, on each path.

For each torchvision / timm architecture below: build it with random weights (``dfq.create_model("tv:NAME")``),
give its BatchNorms non-trivial running statistics by one train-mode forward on random inputs (then eval), and at a
small input size (64x64, or the smallest the model accepts; recorded) run

1. ZeroQ W8A8 under the deploy protocol (``ZeroQConfig(num_samples=4, steps=2)``);
2. ``dfq.export_onnx`` of that Q with a parity check on one batch of 8 random inputs: the integer and float
   operators ONNX Runtime runs, top-1 agreement of ONNX with PyTorch, the worst site's LSB difference;
3. Recon W4A4 under the deploy protocol with tiny settings.

Each model runs in subprocesses with timeouts (ZeroQ + export together, then Recon), so a hang or crash does not
stop the benchmark. A DFQError is recorded as its one-line message; any other exception as
``crash: Type: message`` (a bug), with the innermost frame of its traceback. Weights are random, so this measures
coverage (does it run, does the export match PyTorch), not accuracy.

Usage: python benchmarks/coverage.py [--only NAME,NAME] [--timeout 120]
Writes benchmarks/results/coverage.json (after every model, so a cut run keeps what finished) and prints a markdown
table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

TV = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_small",
      "mobilenet_v3_large", "efficientnet_b0", "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf",
      "shufflenet_v2_x1_0", "mnasnet1_0", "densenet121", "googlenet", "inception_v3", "squeezenet1_1", "vgg11_bn",
      "alexnet"]  # fmt: skip
TIMM = ["efficientnet_lite0", "mobilenetv3_large_100", "ghostnet_100", "repvgg_a0", "rexnet_100", "resnet18d",
        "cspresnet50", "hrnet_w18_small"]  # fmt: skip
NO_BN = ["convnext_tiny", "vit_b_16"]  # torchvision, BatchNorm-free
MODELS = [f"tv:{n}" for n in TV] + [f"timm:{n}" for n in TIMM] + [f"tv:{n}" for n in NO_BN]
# Smallest accepted where 64 is not (vit_b_16: a fixed image_size). inception_v3 runs from 75 in eval mode; its
# auxiliary head, which only train mode runs and which needs ~299, is detached for the BatchNorm-statistics forward.
INPUT = {"tv:inception_v3": 75, "tv:vit_b_16": 224}
DEFAULT_INPUT = 64
MARK = "@@COVERAGE "


def _error(e: BaseException) -> dict:
    from dfq.errors import DFQError

    msg = " ".join(str(e).split())
    if isinstance(e, DFQError):
        return {"error": f"{type(e).__name__}: {msg}", "kind": "dfq"}
    frame = traceback.extract_tb(e.__traceback__)[-1]
    where = f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"
    return {"error": f"crash: {type(e).__name__}: {msg[:400]}", "kind": "crash", "where": where}


def _emit(step: str, payload: dict) -> None:
    print(MARK + json.dumps({"step": step, **payload}), flush=True)


def _prepare(name: str, size: int):
    import torch

    import dfq

    torch.manual_seed(0)
    p = dfq.create_model(name)
    p.train()
    aux = getattr(p, "AuxLogits", None)  # inception_v3: train-mode only, and needs a ~299 input
    if aux is not None:
        p.AuxLogits = None
    with torch.no_grad():
        p(torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(1)))  # BatchNorm running stats
    if aux is not None:
        p.AuxLogits = aux
    return p.eval()


def worker(name: str, size: int, part: str) -> None:
    import torch

    import dfq

    ok, p = _step("build", lambda: _prepare(name, size), report_ok=False)
    if not ok:
        return
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    if part == "recon":
        cfg = dfq.methods.ReconConfig(num_samples=8, synth_batch=8, synth_steps=2, iters=2, batch_size=4)
        _step("recon", lambda: dfq.quantize(p, dfq.QuantConfig(wbits=4, abits=4, protocol="deploy"), cfg,
                                            example_inputs=x, progress=False))  # fmt: skip
        return
    method = dfq.methods.ZeroQConfig(num_samples=4, steps=2)
    ok, result = _step("zeroq", lambda: dfq.quantize(p, dfq.QuantConfig(wbits=8, abits=8, protocol="deploy"), method,
                                                     example_inputs=x, progress=False))  # fmt: skip
    if ok:
        batch = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(3))
        _step("export", lambda: _export(result, batch), report_ok=False)


def _step(step: str, fn, report_ok: bool = True) -> tuple[bool, object]:
    """Run one step, reporting its time and either success or the error's one line; returns (ok, its value)."""
    t0 = time.perf_counter()
    try:
        value = fn()
    except Exception as e:
        _emit(step, {**_error(e), "seconds": time.perf_counter() - t0})
        return False, None
    if report_ok:
        _emit(step, {"ok": True, "seconds": time.perf_counter() - t0})
    return True, value


def _export(result, batch) -> None:
    import dfq

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        r = dfq.export_onnx(result, Path(tmp) / "q.onnx", verify=[batch])
    v = r.get("verify", {})
    sites = v.get("sites", [])
    worst = max(sites, key=lambda s: s["max_lsb"]) if sites else None
    _emit("export", {"ok": True, "seconds": time.perf_counter() - t0, "bytes": r["bytes"],
                     "integer_ops": r["integer_ops"], "float_ops": r["float_ops"],
                     "top1_agreement": v.get("top1_agreement"), "logits_max_abs_error": v.get("logits_max_abs_error"),
                     "sites": len(sites), "worst_site": worst})  # fmt: skip


def run_part(name: str, size: int, part: str, timeout: float) -> dict:
    """Run one part in a subprocess; returns {step: record} for the steps it reported."""
    cmd = [sys.executable, __file__, "--worker", name, "--size", str(size), "--part", part]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, rc = "", "timeout"
    steps = {}
    for line in out.splitlines():
        if line.startswith(MARK):
            rec = json.loads(line[len(MARK) :])
            steps[rec.pop("step")] = rec
    expected = ["recon"] if part == "recon" else ["zeroq", "export"]
    if "build" not in steps:
        for s in expected:
            if s in steps:
                continue
            if steps and not steps[expected[0]].get("ok", False):
                break  # zeroq failed: export not attempted
            if rc == "timeout":
                steps[s] = {"error": f"timeout after {timeout:.0f} s", "kind": "timeout"}
            else:
                tail = " ".join(err.strip().splitlines()[-1:])[:300]
                steps[s] = {"error": f"crash: process exited {rc}: {tail}", "kind": "crash"}
            break
    steps.setdefault("_wall", {})[part] = time.perf_counter() - t0
    return steps


def _fmt_ops(ops: dict) -> str:
    return ", ".join(f"{v} {k}" for k, v in sorted(ops.items())) or "none"


def _status(rec: dict | None) -> str:
    if rec is None:
        return "–"
    return "ok" if rec.get("ok") else ("timeout" if rec.get("kind") == "timeout" else "FAIL")


def row(r: dict) -> str:
    s = r["steps"]
    if "build" in s:
        return f"| {r['model']} | {r['input']} | build FAIL | – | – | – | {s['build']['error']} |"
    ex = s.get("export")
    if ex and ex.get("ok"):
        ints, flts = sum(ex["integer_ops"].values()), sum(ex["float_ops"].values())
        export = f"ok ({ints}/{flts})"
        w = ex["worst_site"]
        agree = f"{100 * ex['top1_agreement']:.0f}%"
        parity = f"{agree}, {w['max_lsb']:.0f} LSB" if w else agree
    else:
        export, parity = _status(ex), "–"
    first = next((s[k]["error"] for k in ("zeroq", "export", "recon") if k in s and not s[k].get("ok")), "")
    return (f"| {r['model']} | {r['input']} | {_status(s.get('zeroq'))} | {export} | {parity} | "
            f"{_status(s.get('recon'))} | {first[:160]} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma-separated model names (tv:NAME / timm:NAME)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per model per path")
    ap.add_argument("--worker"), ap.add_argument("--size", type=int), ap.add_argument("--part")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.size, args.part)

    sys.path.insert(0, str(Path(__file__).parent))
    from _common import write_result

    models = [m for m in args.only.split(",") if m] or MODELS
    rows = []
    out = Path(__file__).parent / "results" / "coverage.json"
    kept = json.loads(out.read_text())["rows"] if args.only and out.exists() else []  # rows this run does not redo
    header = ("| model | input | zeroq W8A8 | export (integer/float ops) | parity (agreement, max LSB) | recon W4A4 "
              "| first error |\n|---|---|---|---|---|---|---|")  # fmt: skip
    print(header, flush=True)
    for name in models:
        size = INPUT.get(name, DEFAULT_INPUT)
        steps = run_part(name, size, "zeroq", 2 * args.timeout)  # ZeroQ + export: two paths
        if "build" not in steps:
            more = run_part(name, size, "recon", args.timeout)
            steps["_wall"].update(more.pop("_wall"))
            steps.update(more)
        r = {"model": name, "input": size, "steps": steps}
        rows.append(r)
        print(row(r), flush=True)
        done = {x["model"]: x for x in kept} | {x["model"]: x for x in rows}
        all_rows = [done[m] for m in MODELS if m in done] + [x for m, x in done.items() if m not in MODELS]
        counts = {
            step: sum(1 for x in all_rows if x["steps"].get(step, {}).get("ok"))
            for step in ("zeroq", "export", "recon")
        }
        write_result("coverage", {
            "settings": {"zeroq": "W8A8 deploy, ZeroQConfig(num_samples=4, steps=2)",
                         "export": "export_onnx(verify=[8 random inputs])",
                         "recon": "W4A4 deploy, ReconConfig(num_samples=8, synth_batch=8, synth_steps=2, iters=2, "
                                  "batch_size=4)",
                         "bn_stats": "one train-mode forward on 8 random inputs, then eval",
                         "timeout_s": {"zeroq+export": 2 * args.timeout, "recon": args.timeout},
                         "torch_threads": os.environ.get("OMP_NUM_THREADS", "default")},
            "models": len(all_rows), "ok_counts": counts,
            "rows": all_rows, "table": "\n".join([header, *map(row, all_rows)]),
        })  # fmt: skip
    print(f"\nworking (of {len(all_rows)} in the file): zeroq {counts['zeroq']}, export {counts['export']}, "
          f"recon {counts['recon']}")  # fmt: skip


if __name__ == "__main__":
    main()
