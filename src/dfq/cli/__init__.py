"""Command-line interface: a thin layer over :mod:`dfq.api` (the commands are in :mod:`dfq.cli.commands`).

Errors a user can cause print one line on stderr and exit with code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

import torch

import dfq
from dfq.cli.commands import (
    cmd_bench,
    cmd_eval,
    cmd_export,
    cmd_methods,
    cmd_models,
    cmd_quantize,
    cmd_report,
    cmd_synthesize,
)
from dfq.cli.sweep import cmd_sweep
from dfq.errors import DFQError
from dfq.export.onnx import WEIGHT_STORAGES
from dfq.export.runtime import RUNTIMES
from dfq.train import RunInterrupted
from dfq.utils.allocator import reuse_freed_memory

__all__ = ["EXIT_USER_ERROR", "main"]

EXIT_USER_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --nproc re-runs under torchrun
    if not args.low_memory:
        reuse_freed_memory()  # large CPU tensors reuse freed memory: recon steps 1.4-1.6x faster at 224 px
    try:
        return int(args.func(args) or 0)
    except RunInterrupted as e:
        print(f"dfq: {e}", file=sys.stderr)
        return e.exit_code
    except DFQError as e:
        if args.debug:
            traceback.print_exc()
        print(f"dfq: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("dfq: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, torch.OutOfMemoryError) as e:
        if args.debug:
            traceback.print_exc()
        print(
            f"dfq: error: out of memory ({type(e).__name__}); lower --set method.train.batch_size or --eval-batch-size",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR


class _Parser(argparse.ArgumentParser):
    """argparse exits with 2 on usage errors already; keep its message to one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"dfq: error: {message} (see `{self.prog} --help`)\n")


def _build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    common.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    common.add_argument("--no-progress", action="store_true", help="hide progress bars")
    common.add_argument("--low-memory", action="store_true",
                        help="leave glibc's allocator as it is: less peak memory, slower on 224-px models")  # fmt: skip

    parser = _Parser(prog="dfq", description="Data-free quantization of neural networks.")
    parser.add_argument("--version", action="version", version=f"dfq {dfq.__version__}")
    parser.set_defaults(debug=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("methods", parents=[common], help="list the data-free methods")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("models", parents=[common], help="list the model zoo")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'resnet*'")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("eval", parents=[common], help="evaluate a float model or a quantized run on real data")
    p.add_argument(
        "target", help="a model name from `dfq models`, a run directory from `dfq quantize`, or an exported .onnx"
    )
    p.add_argument("--data", required=True, help="test set: .npz, CIFAR archive/folder or ImageNet class folder")
    p.add_argument("--weights", help="float checkpoint for a model name (default: the published weights)")
    _add_runtime_arg(p, "an .onnx file runs on")
    _add_data_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("quantize", parents=[common], help="quantize a model without training data")
    p.add_argument("model", help="model name from `dfq models`")
    p.add_argument("--method", help="data-free method (default: recon; `dfq methods` lists them)")
    p.add_argument("--wbits", type=int, help="weight bit-width, 2-8 (default 4)")
    p.add_argument("--abits", type=int, help="activation bit-width, 2-8 (default 4)")
    p.add_argument("--weights", help="float checkpoint (default: the published weights)")
    p.add_argument("--config", help="YAML preset; command-line values override it")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--seed", type=int, help="seed of every random stream (default 0)")
    p.add_argument("--data", help="real test set, used only to report accuracy")
    p.add_argument(
        "--protocol",
        choices=["paper", "deploy"],
        help="deploy: what integer runtimes run, exportable (default); paper: the DFQ papers' fake quantization "
        "(the papers' presets set it)",
    )
    _add_set_arg(
        p,
        "any config key, e.g. method.train.epochs=10, method.iters=200, quant.act_observer=minmax "
        "(repeatable; docs/configuration.md lists them)",
    )
    p.add_argument("--device", default="auto", help="generator-based methods: cpu, cuda or auto (CUDA when available)")
    p.add_argument(
        "--nproc",
        type=int,
        help="generator-based methods: run data-parallel on N local processes (torchrun --standalone "
        "--nproc_per_node N): one per GPU, or gloo processes on the CPU",
    )
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="PATTERN=WxAy",
        help="per-layer bits by name pattern, e.g. conv1=W8 or 'linear=W8A8' (repeatable)",
    )
    p.add_argument(
        "--ends-bits",
        type=int,
        metavar="B",
        help="keep the first and last layers (weights and the activations next to them) at B bits, as "
        "BRECQ/QDrop/Genie do; not the DFQ papers' protocol (quant.ends_bits)",
    )
    p.add_argument(
        "--export",
        metavar="FILE.onnx",
        help="also write Q as ONNX (deploy protocol) and, with --data, report its ONNX Runtime top-1",
    )
    _add_mixed_args(p)
    _add_data_args(p, batch_flag="--eval-batch-size")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("sweep", parents=[common], help="uniform and mixed-precision runs, and their report")
    p.add_argument("model", help="model name from `dfq models`")
    p.add_argument("--uniform", metavar="W8A8,W4A4", help="uniform settings to run")
    p.add_argument(
        "--mixed",
        metavar="W4A4,W3A3",
        help="mixed precision under the size and bit-operations of each of these uniform settings",
    )
    p.add_argument("--out", required=True, help="directory of the runs (one per point) and of report/")
    p.add_argument("--method", help="data-free method (default: recon)")
    p.add_argument("--weights", help="float checkpoint (default: the published weights)")
    p.add_argument("--config", help="YAML preset; command-line values override it")
    p.add_argument("--seed", type=int, help="seed of every random stream (default 0)")
    p.add_argument("--data", help="real test set, used only to report accuracy")
    _add_set_arg(p, "any config key, for every point (repeatable)")
    _add_data_args(p, batch_flag="--eval-batch-size")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("synthesize", parents=[common], help="synthetic calibration images for other toolchains")
    p.add_argument("model", help="model name from `dfq models`")
    p.add_argument("--weights", help="float checkpoint (default: the published weights)")
    p.add_argument("--num-samples", "--num", dest="num", type=int, default=256, help="number of images (default 256)")
    p.add_argument("--out", required=True, help=".npz (images, mean, std) or .npy file to write")
    p.add_argument(
        "--synthesizer",
        choices=["decoder", "pixels"],
        default="decoder",
        help="decoder: latent maps and a decoder (recon's pool); pixels: ZeroQ's pixel optimisation",
    )
    p.add_argument("--steps", type=int, help="optimisation steps (default: 150 per batch for recon, 500 for zeroq)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthesis")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.set_defaults(func=cmd_synthesize)

    p = sub.add_parser("export", parents=[common], help="export a deploy-protocol run (or a float model) to ONNX")
    p.add_argument("target", help="a run directory from `dfq quantize` (deploy protocol), or a model name (float)")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format")
    p.add_argument("--out", required=True, help="file to write, e.g. model.onnx")
    p.add_argument("--weights", help="float checkpoint for a model name (default: the published weights)")
    p.add_argument("--verify", action="store_true", help="compare PyTorch and the runtime layer by layer")
    _add_runtime_arg(p, "--verify runs on")
    p.add_argument("--weight-storage", choices=WEIGHT_STORAGES, default="packed",
                   help="weights of <=4 bits: packed (INT2/INT4, default), int4 (INT4 also for 2 bits: OpenVINO), "
                   "int8 (8-bit containers, opset 17)")  # fmt: skip
    p.add_argument("--data", help="--verify on these real images (default: 256 random inputs)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    _add_data_args(p, batch_flag="--eval-batch-size")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", parents=[common], help="plots and a comparison table of run directories")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories from `dfq quantize`")
    p.add_argument("--out", required=True, help="directory for report.md, report.html and the PNG plots")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("bench", parents=[common], help="time the training iteration against its lower bound")
    p.add_argument("model", help="model name from `dfq models` (random weights: timings do not depend on them)")
    p.add_argument("--method", required=True, help="generator-based method")
    p.add_argument("--batch-size", type=int, required=True, help="generated images per iteration")
    p.add_argument("--iters", type=int, default=30, help="timed iterations after the warm-up")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations first")
    p.add_argument("--bits", type=int, default=4, help="weight and activation bit-width")
    p.add_argument("--fast", action="store_true", help="time the fast mode (bfloat16 autocast, channels-last)")
    p.set_defaults(func=cmd_bench)
    return parser


def _add_mixed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mixed precision (choose each layer's bits under a budget; see docs/mixed_precision.md)")
    g.add_argument(
        "--size-budget",
        metavar="SIZE",
        help="weight storage, e.g. 180KB, 0.5MB, or W4A4 (the size of uniform W4A4) (mixed.size)",
    )
    g.add_argument(
        "--bops-budget",
        metavar="BOPS",
        help="bit-operations per input, e.g. 0.65G, or W4A4 (those of uniform W4A4) (mixed.bops)",
    )
    g.add_argument("--avg-wbits", type=float, metavar="B", help="average bits per weight (mixed.avg_wbits)")
    g.add_argument(
        "--pairs",
        metavar="W4A8,W8A8",
        help="the only (weight, input) bit pairs the target runs, e.g. W4A8,W8A8 (mixed.pairs)",
    )


def _add_runtime_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--runtime", choices=list(RUNTIMES), default="onnxruntime", help=f"the runtime {what}")


def _add_set_arg(p: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable), as ``quantize`` and ``sweep`` both take it."""
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE", help=help)


def _add_data_args(p: argparse.ArgumentParser, batch_flag: str = "--batch-size") -> None:
    p.add_argument(batch_flag, dest="eval_batch_size", type=int, default=500, help="evaluation batch size")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes (image folders)")
    p.add_argument("--limit", type=int, help="evaluate only the first N images")
