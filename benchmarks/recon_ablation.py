"""Where `recon` loses accuracy: its settings varied one at a time, and a diagnostic with real images.

Each variant runs `dfq.methods.recon.recon` on resnet20a_cifar10 with the default `ReconConfig` plus the variant's
overrides, seed 0 unless `--seed` says otherwise, and evaluates the final model on both test sets (no selection).
The `real-pool` variants are a **diagnostic, not a method**: the synthetic pool is replaced by the first N images of
the JPEG-75 test set, which bounds what better synthesis could buy (and leaks test images into the JPEG-75 figure);
nothing in dfq uses it.

With `--shared-pool N`, one synthetic pool of N images (seed 0) is synthesized once, cached as
`runs/recon-pool-N-s0.pt`, and every variant reconstructs from its first `num_samples` images: the variants then
differ only in their reconstruction settings, and each costs only its reconstruction (`seconds`; add the pool's
`synthesize_s`, pro rata, for the whole method); `--seed` then seeds only the reconstruction. Those rows go to
`recon_shared_pool.json`.

Usage: python benchmarks/recon_ablation.py [--bits 4] [--variants NAME ...] [--shared-pool N] [--seed S]
Writes benchmarks/results/recon_ablation.json (or recon_shared_pool.json), replacing rows of the same variant,
bit-width and seed (a row without a seed is seed 0); each new row records its command, and the file's note on
earlier rows is kept.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from _common import RESULTS, ROOT, TEST_SETS, WEIGHTS, command, top1_on, write_result

import dfq
from dfq.config import resolve_config
from dfq.data import open_dataset
from dfq.data.loader import make_loader
from dfq.generators import synthesize_pool
from dfq.methods.recon import reconstruct
from dfq.models import create_model
from dfq.utils.seed import seed_everything

VARIANTS = {
    "default": {},
    "default-256-500": {"num_samples": 256, "iters": 500},
    "iters-2000": {"num_samples": 256, "iters": 2000},
    "samples-1024-iters-2000": {"iters": 2000},
    "label-ce-1": {"label_weight": 1.0},
    "synth-steps-500": {"synth_steps": 500},
    "no-swing": {"swing": False},
    "no-qdrop": {"drop_prob": 0.0},
    "real-pool-256-500": {"pool": "real", "num_samples": 256, "iters": 500},
    "real-pool": {"pool": "real"},
    "learn-bn-1e-3": {"lr_bn": 1e-3},
    "learn-bn-1e-4": {"lr_bn": 1e-4},
    "samples-2048": {"num_samples": 2048},
    "samples-3072-iters-2000": {"num_samples": 3072, "iters": 2000},
    "samples-3072-iters-2000-batch-64": {"num_samples": 3072, "iters": 2000, "batch_size": 64},
    "batch-64": {"batch_size": 64},
    "ends-8bit-diagnostic": {"quant.overrides": {"conv1": {"wbits": 8}, "linear": {"wbits": 8}}},
    "a8-diagnostic": {"quant.abits": 8},
    "w8-diagnostic": {"quant.wbits": 8},
    "a8-internal-diagnostic": {"quant.overrides": {"layer*.relu1": {"abits": 8}}},
    "a8-stream-diagnostic": {"quant.overrides": {"relu": {"abits": 8}, "layer*.relu2": {"abits": 8}}},
    "lr-astep-4e-4": {"lr_astep": 4e-4},
    # Genie's / BRECQ's protocol: first and last layer at 8 bits, weights and inputs (the stem's output feeds the
    # second layer; the last block's output, pooled, is the classifier's input). A separate column, not the papers'.
    "genie-ends": {"quant.ends_bits": 8},
}


def shared_pool(n: int) -> tuple[torch.Tensor, float]:
    """The cached pool of ``n`` synthetic images (seed 0) and the seconds its synthesis took."""
    path = ROOT / "runs" / f"recon-pool-{n}-s0.pt"
    if path.is_file():
        cached = torch.load(path)
        return cached["pool"], cached["synthesize_s"]
    p = create_model("resnet20a_cifar10", pretrained=False, weights=WEIGHTS)
    c = resolve_config(None, {"method.name": "recon", "method.num_samples": n}).method
    seed_everything(0)
    start = time.perf_counter()
    pool = synthesize_pool(p, p.dfq_info.input_size, n, batch=c.synth_batch, steps=c.synth_steps, lr=c.synth_lr,
                           swing=c.swing, lowpass=c.lowpass, label_weight=c.label_weight,
                           generator=torch.Generator().manual_seed(0), progress=False)  # fmt: skip
    seconds = round(time.perf_counter() - start, 1)
    path.parent.mkdir(exist_ok=True)
    torch.save({"pool": pool, "synthesize_s": seconds}, path)
    return pool, seconds


def run_variant(name: str, bits: int, shared: torch.Tensor | None = None, seed: int = 0) -> dict:
    overrides = dict(VARIANTS[name])
    real = overrides.pop("pool", None) == "real"
    p = create_model("resnet20a_cifar10", pretrained=False, weights=WEIGHTS)
    info = p.dfq_info
    config = resolve_config(None, {"method.name": "recon", "quant.wbits": bits, "quant.abits": bits,
                                   **{k if "." in k else f"method.{k}": v for k, v in overrides.items()}})  # fmt: skip
    pool = shared[: config.method.num_samples] if shared is not None else None
    if real:
        images = open_dataset(TEST_SETS["jpeg75"])
        pool = torch.cat([x for x, _ in make_loader(images, info.mean, info.std, limit=config.method.num_samples)])
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if pool is None:  # the method end to end: its own pool, then reconstruction
        result = dfq.quantize(p, config.quant, config.method, seed=seed, progress=False)
        q, timings = result.model, {k: result.summary[k] for k in ("synthesize_s", "reconstruct_s")}
    else:  # a given pool: reconstruction alone, with the stream the method would give it
        seed_everything(seed)
        q = reconstruct(p, config.quant, config.method, pool, generator=torch.Generator().manual_seed(seed))
    seconds = round(time.perf_counter() - start, 1)
    top1 = top1_on(q, TEST_SETS)
    return {"variant": name, "bits": bits, "seed": seed, "overrides": VARIANTS[name], "diagnostic_real_pool": real,
            "seconds": seconds, **timings, **top1}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--shared-pool", type=int, metavar="N", help="reconstruct every variant from one cached pool")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the synthesis and the reconstruction (of the reconstruction only with --shared-pool)",
    )
    args = parser.parse_args()
    if not WEIGHTS.is_file():
        print(f"skipped: {WEIGHTS} not found", file=sys.stderr)
        return 0
    name_out = "recon_shared_pool" if args.shared_pool else "recon_ablation"
    old = RESULTS / f"{name_out}.json"
    previous = json.loads(old.read_text()) if old.is_file() else {}
    rows = previous.get("results", [])
    note = {"note": previous["note"]} if "note" in previous else {}  # provenance of rows written by earlier commands
    fp = top1_on(create_model("resnet20a_cifar10", pretrained=False, weights=WEIGHTS), TEST_SETS)
    shared, pool_s = shared_pool(args.shared_pool) if args.shared_pool else (None, None)
    extra = {"shared_pool": {"num_samples": args.shared_pool, "synthesize_s": pool_s}} if shared is not None else {}
    for name in args.variants:
        row = {**run_variant(name, args.bits, shared, args.seed), "command": command()}
        key = (name, args.bits, args.seed)
        rows = [r for r in rows if (r["variant"], r["bits"], r.get("seed", 0)) != key] + [row]
        print(json.dumps(row), flush=True)
        path = write_result(name_out, {"model": "resnet20a_cifar10", "fp_top1": fp, **extra, **note,
                                       "results": rows})  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
