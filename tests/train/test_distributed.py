"""Data-parallel runs: 2 gloo processes × B/2 give what 1 process × B gives (docs/methods.md on the global batch).

One module-scoped fixture starts two processes once; each runs every case below on the tiny classifier of
:mod:`dfq.testing` and saves what it saw. The tests compare those records with the same runs done in this
process with the same global batch (``train.shards = 2``).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from conftest import CIFAR10_4CLASS, RESNET20_WEIGHTS, require_shared
from torch import nn

from dfq.cli import main as cli_main
from dfq.distributed import (
    DistContext,
    GlobalBNStatsLoss,
    global_moments,
    local_batchnorms,
    resolve_device,
    sync_batchnorms,
)
from dfq.errors import DFQError
from dfq.generators import BNStatsLoss, CifarGenerator
from dfq.methods import create_method
from dfq.quant import QuantBatchNorm2d, act_quantizers
from dfq.testing import tiny_classifier, tiny_config, tiny_trainer
from dfq.train import RunInterrupted, Trainer, read_train_checkpoint

METHODS = ["gdfq", "adasg", "adadfq", "zaq"]  # ZAQ last: the run whose Q is checked afterwards
WORLD = 2
# 3 epochs x 2 iterations: warm-up (G only) while observing ranges, Q training while observing, frozen ranges.
SCHEDULE = {"train__epochs": 3, "train__iters_per_epoch": 2, "train__observe_epochs": 2, "train__shards": WORLD}
# float32 sums in a different order; Adam turns a relative gradient error into at most that relative step error.
TOL = {"rtol": 1e-4, "atol": 1e-5}
# G's Adam divides each gradient by its own magnitude, so where a gradient is ~0 (|g| ~ Adam's eps) a rounding
# error of it moves that element's step by up to 2 lr (1e-3; a first Adam step is ±lr, and rounding can flip the
# sign of a gradient that is ~0). G's state: every element within 2 lr per step, and all but 0.1% of them within
# TOL. A bias just before a training-mode BatchNorm has an exactly zero
# gradient (the BatchNorm subtracts the batch mean): what is computed is rounding, which Adam turns into a step
# of up to lr in a random direction (the next BatchNorm's running mean follows it): within 2.5 lr per step.
G_LR = 1e-3
NOISE_DRIVEN = {"conv1.bias", "conv2.bias", "bn1.running_mean", "bn2.running_mean"}


def _config(method: str, **overrides):
    return tiny_config(method, **{**SCHEDULE, "train__batch_size": 8, **overrides})


def _teacher() -> nn.Module:
    """The tiny classifier with logits 30x larger. With its small logits P ≈ Q, AdaSG/AdaDFQ's normaliser
    log C − min H of H′ is ~6e-5 and float32 rounding of the entropies alone moves H′ by ~0.2%."""
    net = tiny_classifier()
    with torch.no_grad():
        net.fc.weight.mul_(30)
        net.fc.bias.mul_(30)
    return net


def _trainer(config, dist_ctx: DistContext | None = None, run_dir: Path | None = None) -> Trainer:
    return tiny_trainer(config, teacher=_teacher(), run_dir=run_dir, dist=dist_ctx)


def _grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": p.grad.clone()
        for name, module in (("G", trainer.game.generator), ("Q", trainer.game.student))
        for k, p in module.named_parameters()
        if p.grad is not None
    }


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _mean_over_ranks(trainer: Trainer, logs: dict[str, torch.Tensor]) -> dict[str, float]:
    """The logged values of the global batch (what metrics.jsonl sums)."""
    values = trainer.dist.mean(torch.stack([v.float() for v in logs.values()]))
    return {k: float(v) for k, v in zip(logs, values, strict=True)}


def _after(trainer: Trainer, logs: dict[str, torch.Tensor]) -> dict:
    """What an iteration produced: its logged values, the gradients of its last steps, the new state."""
    game = trainer.game
    return {
        "logs": _mean_over_ranks(trainer, logs),
        "grads": _grads(trainer),
        "G": _state(game.generator),
        "Q": _state(game.student),
        "q_opt": copy.deepcopy(game.q_opt.state_dict()["state"]),
        "g_opt": copy.deepcopy(game.g_opt.state_dict()["state"]),
    }


def _record(trainer: Trainer, resume: bool = False) -> list[dict]:
    """Run ``trainer`` to the end; per iteration the state it started from and what it produced."""
    steps: list[dict] = []
    method = trainer.game.method
    iteration = method.iteration

    def recording(game, train_q: bool) -> dict[str, torch.Tensor]:
        before = trainer.snapshot()
        logs = iteration(game, train_q)
        steps.append({"before": before, "train_q": train_q, **_after(trainer, logs)})
        return logs

    method.iteration = recording
    trainer.run(resume=resume)
    return steps


def _partial(trainer: Trainer, epochs: int) -> None:
    """Train ``epochs`` epochs and leave the checkpoint a killed run would leave."""
    for _ in range(epochs):
        trainer.train_epoch()


# --------------------------------------------------------------------------------------- the two ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, out: Path) -> None:
    """One rank: every case, its records saved to ``out/<case>.<rank>.pt``."""
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        ctx = DistContext.current()
        for method in METHODS:
            trainer = _trainer(_config(method), ctx)
            torch.save(_record(trainer), out / f"{method}.{rank}.pt")
        q = trainer.game.student
        bns = {type(m).__name__ for m in q.modules() if isinstance(m, nn.BatchNorm2d)}
        reducers = {qa.reduce_range for _, qa in act_quantizers(q)}
        torch.save({"batchnorms": bns, "reducers": reducers}, out / f"ordinary.{rank}.pt")
        torch.save(_primitives(ctx), out / f"primitives.{rank}.pt")
        # Resume across world sizes: finish a checkpoint written by one process; write one for one process.
        torch.save(_record(_trainer(_config("gdfq"), ctx, out / "from1"), resume=True), out / f"from1.{rank}.pt")
        _partial(_trainer(_config("gdfq"), ctx, out / "from2"), epochs=2)
        _check_refusals(ctx, out, rank)
        torch.save(_faults(ctx, out, rank), out / f"faults.{rank}.pt")
    finally:
        dist.destroy_process_group()


def _primitives(ctx: DistContext) -> dict:
    """The global-batch building blocks on this rank's half of a fixed batch, with their gradients."""
    g = torch.Generator().manual_seed(5)
    x = (3 + 2 * torch.randn(8, 4, 5, 5, generator=g))[4 * ctx.rank : 4 * (ctx.rank + 1)].requires_grad_()
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    g_mean, g_var = global_moments(mean, var, ctx)
    gathered = ctx.gather(x.sum(dim=(2, 3)))
    (g_mean.sum() + g_var.square().sum() + gathered.square().sum()).backward()
    bn = sync_batchnorms(nn.BatchNorm2d(4, eps=0.8).train(), ctx)
    xb = x.detach().clone().requires_grad_()
    y = bn(xb)
    ctx.gather(y).pow(3).sum().backward()  # the same global loss on every rank
    lo, hi = ctx.global_range(x.detach().min(), x.detach().max())
    deploy_bn = sync_batchnorms(QuantBatchNorm2d(4).train(), ctx)  # a subclass keeps its own forward
    xd = x.detach().clone()
    deploy = {"class": type(deploy_bn).__name__, "out": ctx.gather(deploy_bn(xd))}
    deploy["restored"] = type(local_batchnorms(deploy_bn)).__name__
    return {
        "deploy_bn": deploy,
        "moments": (g_mean.detach(), g_var.detach()),
        "gathered": gathered.detach(),
        "x_grad": x.grad,
        "bn_out": ctx.gather(y.detach()),
        "bn_x_grad": ctx.gather(xb.grad),
        "bn_state": _state(bn),
        "bn_param_grads": [p.grad.clone() for p in bn.parameters()],
        "range": (lo, hi),
        "bn_class": type(bn).__name__,
    }


def _faults(ctx: DistContext, out: Path, rank: int) -> dict:
    """A NaN and a stop request seen by rank 1 only: every rank must take the same branch."""
    trainer = _trainer(_config("adadfq"), ctx)
    method = trainer.game.method
    loss, calls = method.generator_loss, []

    def nan_on_rank_1(batch):
        calls.append(1)
        losses = loss(batch)
        if rank == 1 and len(calls) == 3:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    method.generator_loss = nan_on_rank_1
    trainer.run()
    stopped = _trainer(_config("gdfq"), ctx, out / "stopped")
    iteration, iterations = stopped.game.method.iteration, []

    def sigterm_on_rank_1(game, train_q):
        iterations.append(1)
        if rank == 1 and len(iterations) == 3:  # epoch 1, iteration 0
            os.kill(os.getpid(), signal.SIGTERM)
        return iteration(game, train_q)

    stopped.game.method.iteration = sigterm_on_rank_1
    try:
        stopped.run()
        interrupted = None
    except RunInterrupted as e:
        interrupted = (e.exit_code, stopped.state.epoch, stopped.state.iteration)
    return {"rollbacks": trainer.rollbacks, "G": _state(trainer.game.generator), "interrupted": interrupted}


def _check_refusals(ctx: DistContext, out: Path, rank: int) -> None:
    """What a data-parallel run refuses, with the reason."""
    messages = []
    for overrides in ({"plugins__lsq": True, "quant__weight_scales": "stored"}, {"train__shards": 1}):
        try:
            _trainer(_config("gdfq", **overrides), ctx)
        except DFQError as e:
            messages.append(str(e))
    torch.save(messages, out / f"refusals.{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Start two gloo processes once; they run every case. Returns the folder of their records."""
    out = tmp_path_factory.mktemp("ranks")
    one = _trainer(_config("gdfq"), run_dir=out / "from1")  # a one-process checkpoint for the ranks to resume
    _partial(one, epochs=2)
    mp.start_processes(_rank_main, args=(_free_port(), out), nprocs=WORLD, start_method="spawn")
    return out


def _load(ranks: Path, case: str) -> list[dict]:
    return [torch.load(ranks / f"{case}.{r}.pt", weights_only=False) for r in range(WORLD)]


def _assert_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOL, msg=lambda m, k=k: f"{what} {k}: {m}")


def _assert_close_after_adam(got: dict, want: dict, what: str, steps: int) -> None:
    """G's state ``steps`` Adam steps after a common one (see G_LR)."""
    assert got.keys() == want.keys(), what
    loose = total = 0
    for k in want:
        bound = steps * G_LR * (2.5 if k in NOISE_DRIVEN else 2.0)  # 2 lr: Adam's first step, sign flipped
        torch.testing.assert_close(got[k], want[k], rtol=0.0, atol=bound, msg=lambda m, k=k: f"{what} {k}: {m}")
        if k not in NOISE_DRIVEN and want[k].is_floating_point():
            loose += int((~torch.isclose(got[k], want[k], **TOL)).sum())
            total += want[k].numel()
    assert loose <= 1e-3 * total, f"{what}: {loose} of {total} elements differ by more than {TOL}"


def _assert_same_step(got: dict, want: dict, what: str, steps: int = 1) -> None:
    """The same logged values, gradients, parameters, buffers and optimizer states."""
    assert got["logs"].keys() == want["logs"].keys(), what
    for k, v in want["logs"].items():
        # H′ (in [0, 1]) is an entropy rescaled by the batch's extremes, a ratio of differences: its quantiles carry
        # about 10x the rounding error of the losses (measured: 1.1e-4 relative, 1.1e-5 absolute near 0)
        tol = (
            {"rel": 10 * TOL["rtol"], "abs": 10 * TOL["atol"]}
            if "h_norm" in k
            else {"rel": TOL["rtol"], "abs": TOL["atol"]}
        )
        assert got["logs"][k] == pytest.approx(v, **tol), f"{what}: {k}"
    _assert_close(got["grads"], want["grads"], f"{what}: gradients")
    _assert_close(got["Q"], want["Q"], f"{what}: Q")
    _assert_close_after_adam(got["G"], want["G"], f"{what}: G", steps)
    for part in ("q_opt", "g_opt"):
        assert got[part].keys() == want[part].keys()
        for k, state in want[part].items():
            _assert_close(got[part][k], state, f"{what}: {part} {k}")


def _replay(method: str, step: dict) -> dict:
    """One iteration of a one-process run from the state a rank started that iteration from."""
    trainer = _trainer(_config(method))
    trainer.restore(step["before"])
    return _after(trainer, trainer.game.iteration(step["train_q"]))


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("method", METHODS)
def test_every_iteration_of_two_ranks_equals_one_process_with_the_global_batch(ranks, method):
    """From the same state, each iteration of 2 ranks × 4 images gives what 1 process × 8 images gives.

    Step by step, because these games amplify float rounding: on this tiny model, a 1e-7 relative change of
    G's weights moves AdaSG's logged losses by 15% at the sixth iteration in a single process."""
    per_rank = _load(ranks, method)
    assert len(per_rank[0]) == 6  # warm-up while observing ranges, Q training while observing, frozen ranges
    assert [s["train_q"] for s in per_rank[0]] == [False, False, True, True, True, True]
    for rank, steps in enumerate(per_rank):
        for i, step in enumerate(steps):
            _assert_same_step(step, _replay(method, step), f"rank {rank} iteration {i}")


def test_a_whole_gdfq_run_of_two_ranks_equals_one_process(ranks):
    """GDFQ's game is tame enough here for the whole 6-iteration runs to agree as well (ZAQ's SGD at lr 0.1 and
    AdaSG/AdaDFQ's H′ amplify rounding differences to ~0.2% of a loss within 5 iterations)."""
    want = _record(_trainer(_config("gdfq")))
    for steps in _load(ranks, "gdfq"):
        for i, (got, ref) in enumerate(zip(steps, want, strict=True)):
            _assert_same_step(got, ref, f"iteration {i}", steps=i + 1)


def test_the_batch_statistics_are_the_global_batch(ranks):
    single = DistContext()
    g = torch.Generator().manual_seed(5)
    x = (3 + 2 * torch.randn(8, 4, 5, 5, generator=g)).requires_grad_()
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    (mean.sum() + var.square().sum() + x.sum(dim=(2, 3)).square().sum()).backward()
    bn = nn.BatchNorm2d(4, eps=0.8).train()
    xb = x.detach().clone().requires_grad_()
    y = bn(xb)
    y.pow(3).sum().backward()
    assert single.gather(x) is x and global_moments(mean, var, single) == (mean, var)
    for rank, got in enumerate(_load(ranks, "primitives")):
        half = slice(4 * rank, 4 * (rank + 1))
        torch.testing.assert_close(got["moments"], (mean.detach(), var.detach()))
        torch.testing.assert_close(got["gathered"], x.detach().sum(dim=(2, 3)))
        # The global loss on every rank: each rank's share of the gradient arrives twice, DDP halves it.
        torch.testing.assert_close(got["x_grad"], WORLD * x.grad[half])
        torch.testing.assert_close(got["bn_out"], y.detach())
        torch.testing.assert_close(got["bn_x_grad"], WORLD * xb.grad)
        _assert_close(got["bn_state"], _state(bn), "BatchNorm state")  # running statistics, eps 0.8 kept
        assert got["range"] == (x.min(), x.max())
        assert got["bn_class"] == "_GlobalBatchNorm"
        deploy = got["deploy_bn"]
        assert (deploy["class"], deploy["restored"]) == ("GlobalQuantBatchNorm2d", "QuantBatchNorm2d")
        torch.testing.assert_close(deploy["out"], QuantBatchNorm2d(4).train()(x.detach()), **TOL)
    # The BatchNorm's own parameters: DDP's average of the ranks' gradients is the one-process gradient.
    per_rank = [got["bn_param_grads"] for got in _load(ranks, "primitives")]
    for k, p in enumerate(bn.parameters()):
        torch.testing.assert_close(sum(grads[k] for grads in per_rank) / WORLD, p.grad, **TOL)


def test_a_run_resumes_on_another_number_of_processes(ranks):
    """Checkpoints hold every shard's noise stream, so a run continues on 2 processes from 1 and on 1 from 2."""
    want = _record(_trainer(_config("gdfq")))
    resumed = {
        "1 then 2": _load(ranks, "from1"),
        "2 then 1": [_record(_trainer(_config("gdfq"), run_dir=ranks / "from2"), resume=True)],
    }
    for what, runs in resumed.items():
        for steps in runs:
            assert len(steps) == 2  # the last epoch
            for i, (got, ref) in enumerate(zip(steps, want[4:], strict=True)):
                _assert_same_step(got, ref, f"{what}, iteration {4 + i}", steps=5 + i)


def test_a_nan_or_a_signal_on_one_rank_takes_every_rank_down_the_same_branch(ranks):
    results = _load(ranks, "faults")
    for got in results:
        assert got["rollbacks"] == 1  # rank 1's NaN rolled both back
        assert got["interrupted"] == (143, 1, 1)  # both stopped after the same iteration
    _assert_close(results[0]["G"], results[1]["G"], "G after the rollback")
    assert read_train_checkpoint(ranks / "stopped")["iteration"] == 1


def test_refusals_name_the_reason(ranks):
    for messages in _load(ranks, "refusals"):
        assert messages[0] == "plugins.cam_weight, plugins.lsq and plugins.adaround run on one process only (for now)"
        assert "run it on a number of processes that divides 1 (got 2)" in messages[1]


def test_one_process_is_unchanged_by_the_distributed_hooks():
    """Without a process group the game's models and losses are the plain ones."""
    game = _trainer(_config("adadfq", train__shards=None)).game
    assert game.streams.shards == 1 and list(game.streams.generators) == [0]
    assert type(game.bns) is BNStatsLoss
    assert all(type(m) is nn.BatchNorm2d for m in game.generator.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(q.reduce_range is None for _, q in act_quantizers(game.student))
    assert isinstance(GlobalBNStatsLoss(tiny_classifier(), DistContext()), BNStatsLoss)
    assert isinstance(CifarGenerator(10, img_size=8).bn1, nn.BatchNorm2d)


def test_one_process_draws_the_global_batch_of_its_shards():
    """Shard k of S has its own stream; one stream (the default) is the single-process stream of before."""
    config = _config("gdfq", train__shards=1)
    plain = _trainer(config).game
    z1, y1 = plain.sample()
    ref = torch.Generator().manual_seed(config.seed)
    assert torch.equal(z1, torch.randn(8, plain.generator.latent_dim, generator=ref))
    assert torch.equal(y1, torch.randint(10, (8,), generator=ref))
    z2, _ = _trainer(_config("gdfq", train__shards=2)).game.sample()
    assert torch.equal(z2[:4], z1[:4]) and not torch.equal(z2[4:], z1[4:])
    with pytest.raises(DFQError, match=r"train.batch_size \(8\) must be a multiple of train.shards \(3\)"):
        _trainer(_config("gdfq", train__shards=3, train__batch_size=8))


def test_shards_must_be_positive():
    with pytest.raises(DFQError, match=r"train\.shards must be >= 1"):
        _config("gdfq", train__shards=0)


def test_q_is_an_ordinary_model_after_a_data_parallel_run(ranks):
    """ZAQ trains Q's BatchNorms on the global batch; the Q a run returns has plain BatchNorms and quantizers."""
    for got in _load(ranks, "ordinary"):
        assert got == {"batchnorms": {"BatchNorm2d"}, "reducers": {None}}


# ------------------------------------------------------------------------------------------ command line
def test_dfq_quantize_nproc_2_matches_one_process_with_two_shards(tmp_path):
    """``dfq quantize --nproc 2`` re-runs itself under torchrun; rank 0 alone writes, evaluates and reports.

    The published weights: with random ones the activations are so large that float rounding differences
    flip some 4-bit codes of Q, which moves AdaDFQ's losses by ~3e-4 already in the first iteration."""
    require_shared(RESNET20_WEIGHTS, CIFAR10_4CLASS)
    common = ["quantize", "resnet20a_cifar10", "--method", "adadfq", "--weights", str(RESNET20_WEIGHTS), "--data"]
    common += [str(CIFAR10_4CLASS), "--limit", "8"]
    for setting in ("method.train.epochs=1", "method.train.iters_per_epoch=1", "method.train.batch_size=4"):
        common += ["--set", setting]
    common += ["--no-progress", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "dfq", *common, "--nproc", "2", "--out", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert two.returncode == 0, two.stderr
    reports = [line for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1  # one JSON line: rank 0's
    summary = json.loads(reports[0])
    assert (summary["processes"], summary["shards"], summary["n"]) == (2, 2, 8)
    assert yaml.safe_load((tmp_path / "two" / "config.yaml").read_text())["method"]["train"]["shards"] == 2

    assert cli_main([*common, "--set", "method.train.shards=2", "--out", str(tmp_path / "one")]) == 0
    (want,) = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    (got,) = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for key, value in want.items():
        if key.startswith(("g_", "q_")) and not key.endswith("lr"):
            assert got[key] == pytest.approx(value, rel=TOL["rtol"], abs=TOL["atol"]), key
    assert got["top1"] == want["top1"]


def test_nproc_and_device_mistakes_are_one_line_errors(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    assert cli_main(["quantize", "resnet20a_cifar10", "--method", "gdfq", "--nproc", "0", "--out", out]) == 2
    assert capsys.readouterr().err.strip() == "dfq: error: --nproc must be >= 1, got 0"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli_main(["quantize", "resnet20a_cifar10", "--method", "gdfq", "--nproc", "2", "--out", out]) == 2
    assert "leave it out under torchrun" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(DFQError, match="no CUDA device is available"):
            resolve_device("cuda")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_post_training_methods_refuse_several_processes():
    with pytest.raises(DFQError, match="'zeroq' runs on one process"):
        create_method("zeroq").check_launch(DistContext(0, 2))
    create_method("gdfq").check_launch(DistContext(0, 2))  # the games run on any number of processes


def test_the_launch_commands_parse():
    """Every launch command of the README and docs/distributed.md is valid for torchrun and for dfq."""
    from torch.distributed.run import get_args_parser

    from dfq.cli import _build_parser

    root = Path(__file__).resolve().parents[2]
    blocks = re.findall(r"## Distributed runs.*?```bash\n(.*?)```", (root / "README.md").read_text(), re.S)
    blocks += re.findall(r"```bash\n(.*?)```", (root / "docs" / "distributed.md").read_text(), re.S)
    lines = [ln for block in blocks for ln in block.replace("\\\n", " ").splitlines()]
    lines = [ln.split("  #")[0] for ln in lines if ln.strip() and not ln.startswith("#")]
    assert sum("torchrun" in ln for ln in lines) >= 3 and any("--nproc" in ln for ln in lines)
    for line in lines:
        words = shlex.split(line.replace("NODE", "0"))
        at = words.index("quantize")
        if words[0] == "torchrun":
            launcher = get_args_parser().parse_args([*words[1 : at - 1], "dfq"])
            assert launcher.module and words[at - 1] == "dfq"
        _build_parser().parse_args(words[at:])
