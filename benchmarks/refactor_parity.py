"""Before/after parity of a refactor: the same commands on two source trees must give the same numbers.

Runs, on the source tree given by ``--src`` (default: this checkout's ``src``), with ``MKL_CBWR=COMPATIBLE``
and the machine's thread count:

- ``dfq quantize resnet20a_cifar10 --method zeroq --wbits 8 --abits 8`` (lossless set): top-1 and Q's hash;
- the ``recon`` W4A4 default at seed 0: top-1 and Q's hash;
- a short AdaDFQ run (the CPU preset cut to 6 epochs x 10 iterations, past warm-up and range observation):
  Q's hash (the final weights).

The AdaDFQ config is written in dfq 0.1's flat layout, which later versions migrate on read. Each label's
rows go into ``benchmarks/results/refactor_parity.json``; with both labels present the file says whether
every pair is identical.

    git worktree add /tmp/dfq-before dec0fef
    python benchmarks/refactor_parity.py --src /tmp/dfq-before/src --label before
    python benchmarks/refactor_parity.py --label after
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from _common import LOSSLESS, RESULTS, ROOT, WEIGHTS, command, provenance

ADADFQ_SHORT = {
    "model": "resnet20a_cifar10",
    "method": "adadfq",
    "quant": {"wbits": 4, "abits": 4},
    "train": {"epochs": 6, "iters_per_epoch": 10, "batch_size": 16, "warmup_epochs": 4, "observe_epochs": 4,
              "q_lr": 0.0001, "q_milestones": [17, 34, 51], "g_milestones": [17, 34, 51], "eval_every": 6},
}  # fmt: skip

JOBS = {
    "zeroq_w8a8": ["--method", "zeroq", "--wbits", "8", "--abits", "8"],
    "recon_w4a4": ["--wbits", "4", "--abits", "4"],
    "adadfq_short": ["--config", "{config}"],
}


def state_hash(run_dir: Path) -> str:
    """sha256 over Q's state dict in ``model.pt``, key by key in sorted order."""
    payload = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    h = hashlib.sha256()
    for key in sorted(payload["state_dict"]):
        t = payload["state_dict"][key].contiguous()
        h.update(key.encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def run_job(src: Path, name: str, args: list[str], work: Path) -> dict:
    config = work / "adadfq_short.yaml"
    config.write_text(yaml.safe_dump(ADADFQ_SHORT))
    out = work / name
    cmd = [sys.executable, "-m", "dfq", "quantize", "resnet20a_cifar10", *[a.format(config=config) for a in args]]
    cmd += ["--weights", str(WEIGHTS), "--data", str(LOSSLESS), "--out", str(out), "--json", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(src), "MKL_CBWR": "COMPATIBLE"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed: {proc.stderr.strip()[-2000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"top1": summary.get("top1"), "q_sha256": state_hash(out),
            "wall_s": round(time.perf_counter() - start, 1), "args": args}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="source tree to run (put on PYTHONPATH)")
    parser.add_argument("--label", required=True, help="name of this side, e.g. before or after")
    parser.add_argument("--jobs", nargs="*", default=list(JOBS), choices=list(JOBS))
    args = parser.parse_args()
    if not (WEIGHTS.is_file() and LOSSLESS.is_file()):
        raise SystemExit(f"skipped: {WEIGHTS} or {LOSSLESS} is missing (see ../shared/data/README.md)")
    path = RESULTS / "refactor_parity.json"
    result = json.loads(path.read_text()) if path.is_file() else {"sides": {}}
    with tempfile.TemporaryDirectory() as tmp:
        rows = {name: run_job(args.src, name, JOBS[name], Path(tmp)) for name in args.jobs}
        for name, row in rows.items():
            print(name, row, flush=True)
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=args.src, capture_output=True, text=True).stdout.strip()
    earlier = result["sides"].get(args.label, {}).get("rows", {})  # a label run job by job keeps its other rows
    commands = {**result["sides"].get(args.label, {}).get("commands", {}), **{name: command() for name in rows}}
    result["sides"][args.label] = {**provenance(), "command": command(), "commands": commands, "src_commit": git,
                                   "rows": {**earlier, **rows}}  # fmt: skip
    sides = list(result["sides"].values())
    if len(sides) >= 2:
        a, b = sides[0]["rows"], sides[-1]["rows"]  # the first label against the last
        result["identical"] = {k: a[k]["top1"] == b[k]["top1"] and a[k]["q_sha256"] == b[k]["q_sha256"]
                               for k in a if k in b}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result.get("identical", {})))


if __name__ == "__main__":
    main()
