"""The training engine of the generator-based methods on a tiny teacher (METHODS.md §1.7, §2-§5).

The teacher is a 3x8x8 CNN with two stages (``layer1``, ``layer2``), so every run
here takes a fraction of a second: the tests check the game's data flow, its
schedules and its persistence, not accuracy.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from dfq.engine import TRAIN_CHECKPOINT, Engine, read_train_checkpoint
from torch import nn
from tqdm.auto import tqdm

from dfq.config import resolve_config
from dfq.errors import DFQError
from dfq.evaluate import evaluate as evaluate_batches
from dfq.quant import ActMode, act_quantizers

pytestmark = pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")  # GDFQ's KLDivLoss, on purpose

METHODS = ["gdfq", "zaq", "adasg", "adadfq"]
LOGGED = {
    "gdfq": {"g_loss", "g_ce", "g_bns", "q_loss", "q_kd", "q_ce"},
    "adasg": {"g_loss", "g_bg", "g_ds", "g_as", "g_bns", "g_h_norm", "q_loss"},
    "adadfq": {"g_loss", "g_bg", "g_ds", "g_as", "g_bns", "g_h_norm", "q_loss"},
    "zaq": {"g_loss", "g_l1", "g_scrm", "g_act", "q_loss", "q_l1", "q_scrm"},
}
INPUT = (3, 8, 8)


class TinyNet(nn.Module):
    """conv-bn-relu stem, a residual stage ``layer1``, a strided stage ``layer2``, pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = x + self.layer1(x)
        return self.fc(self.pool(self.layer2(x)).flatten(1))


class FunctionalReluNet(TinyNet):
    """The same layers, with functional ReLUs: quantize_model rewrites it with torch.fx."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.layer1(x))
        return self.fc(self.pool(self.layer2(x)).flatten(1))


def make_teacher(cls: type[nn.Module] = TinyNet) -> nn.Module:
    g = torch.Generator().manual_seed(1234)
    torch.manual_seed(1234)
    net = cls()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics, so the BNS loss is not ~0
            m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.weight.data.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return net.eval()


def make_config(method: str, **overrides):
    values = {
        "method": method,
        "seed": 3,
        "train.epochs": 2,
        "train.iters_per_epoch": 3,
        "train.batch_size": 8,
        "train.warmup_epochs": 1,
        "train.observe_epochs": 1,
        "train.checkpoint_every": 1,
    }
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return resolve_config(None, values)


def make_engine(config, *, run_dir=None, evaluate=None, teacher: nn.Module | None = None, torch_seed: int = 0):
    torch.manual_seed(torch_seed)  # G's initial weights come from the global RNG
    return Engine(
        config,
        teacher if teacher is not None else make_teacher(),
        num_classes=10,
        input_size=INPUT,
        run_dir=run_dir,
        evaluate=evaluate,
        progress=False,
    )


def quiet_bar() -> tqdm:
    return tqdm(disable=True)


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def ranges(model: nn.Module) -> dict[str, tuple[float, float, int]]:
    return {n: (float(q.lo), float(q.hi), int(q.num_updates)) for n, q in act_quantizers(model)}


def modes(model: nn.Module) -> set[ActMode]:
    return {q.get_mode() for _, q in act_quantizers(model)}


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class FakeEvaluator:
    """Returns the given top-1 values in turn and records what it saw."""

    def __init__(self, scores: list[float]) -> None:
        self.scores = list(scores)
        self.seen: list[dict] = []

    def __call__(self, model: nn.Module) -> dict:
        self.seen.append({"modes": modes(model), "training": model.training})
        return {"top1": self.scores[len(self.seen) - 1], "top5": 100.0}


# ------------------------------------------------------------------ end to end
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_end_to_end(method, tmp_path):
    config = make_config(method, train__q_milestones=[1], train__g_milestones=[1])
    fake = FakeEvaluator([50.0, 20.0])
    engine = make_engine(config, run_dir=tmp_path, evaluate=fake)
    q, summary = engine.run()

    assert q is engine.student
    assert summary["method"] == method and summary["epochs"] == 2 and summary["batch_size"] == 8
    assert (summary["top1"], summary["top1_best"], summary["best_epoch"]) == (20.0, 50.0, 0)
    assert len(fake.seen) == 2

    records = read_metrics(tmp_path)
    assert [r["epoch"] for r in records] == [0, 1]
    assert [r["train_q"] for r in records] == [False, True]  # one warm-up epoch
    assert [r["top1"] for r in records] == [50.0, 20.0]
    for r in records:
        expected = LOGGED[method]  # the warm-up epoch observes ranges, so every method computes Q's loss there
        assert expected <= set(r), f"missing {expected - set(r)}"
        for key in expected:
            assert math.isfinite(r[key]), (key, r[key])
    # Per-epoch multi-step learning rates (milestone at epoch 1).
    t = config.train
    assert records[0]["q_lr"] == pytest.approx(t.q_lr) and records[1]["q_lr"] == pytest.approx(t.q_lr * 0.1)
    assert records[0]["g_lr"] == pytest.approx(t.g_lr) and records[1]["g_lr"] == pytest.approx(t.g_lr * 0.1)

    ckpt = read_train_checkpoint(tmp_path)
    assert (tmp_path / TRAIN_CHECKPOINT).is_file()
    assert ckpt["epoch"] == 2 and [h["top1"] for h in ckpt["history"]] == [50.0, 20.0]
    assert modes(q) == {ActMode.FROZEN}


def test_methods_get_their_generators_and_paper_defaults():
    for method, gen, latent in [("gdfq", "CifarGenerator", 100), ("adadfq", "CifarGenerator", 100)]:
        engine = make_engine(make_config(method))
        assert type(engine.generator).__name__ == gen and engine.generator.latent_dim == latent
    engine = make_engine(make_config("zaq"))
    assert type(engine.generator).__name__ == "UnconditionalGenerator" and engine.generator.latent_dim == 256
    assert engine.features == ["layer1", "layer2"]  # auto-detected stages of a model outside the zoo
    z = resolve_config(None, {"method": "zaq"}).train
    assert (z.q_lr, z.q_nesterov, z.q_weight_decay, z.g_betas, z.warmup_epochs) == (0.1, False, 5e-4, [0.9, 0.999], 0)
    g = resolve_config(None, {"method": "gdfq"}).train
    assert (g.batch_size, g.q_lr, g.q_nesterov, g.g_betas, g.warmup_epochs) == (200, 1e-4, True, [0.5, 0.999], 4)


# ------------------------------------------------------------------ warm-up
@pytest.mark.parametrize("method", ["gdfq", "adadfq", "zaq"])
def test_warmup_trains_only_the_generator(method, tmp_path):
    engine = make_engine(make_config(method, train__warmup_epochs=2), run_dir=tmp_path)
    q_params = {n: p.detach().clone() for n, p in engine.student.named_parameters()}
    g_before = clone_state(engine.generator)
    engine.run()
    for n, p in engine.student.named_parameters():
        assert torch.equal(p, q_params[n]), f"Q parameter {n} moved during warm-up"
    g_after = engine.generator.state_dict()
    assert not torch.equal(g_after["l1.weight"], g_before["l1.weight"])
    assert not torch.equal(g_after["conv3.weight"], g_before["conv3.weight"])
    assert [r["train_q"] for r in read_metrics(tmp_path)] == [False, False]
    # As in the official loops, Q's loss is computed (not stepped) during warm-up; AdaSG/AdaDFQ, whose G step
    # already ran Q, skip that forward once the ranges are frozen (observe_epochs = 1 here).
    metrics = read_metrics(tmp_path)
    assert math.isfinite(metrics[0]["q_loss"])
    if method in ("gdfq", "zaq"):
        assert math.isfinite(metrics[1]["q_loss"])
    else:
        assert "q_loss" not in metrics[1]


def test_after_warmup_q_moves():
    engine = make_engine(make_config("adadfq", train__warmup_epochs=0, train__epochs=1))
    before = {n: p.detach().clone() for n, p in engine.student.named_parameters()}
    engine.run()
    assert any(not torch.equal(p, before[n]) for n, p in engine.student.named_parameters())


# ------------------------------------------------------------------ activation ranges
@pytest.mark.parametrize("warmup", [0, 3])  # ranges are observed alike whether Q trains or not
@pytest.mark.parametrize(("method", "observations_per_iter"), [("gdfq", 1), ("adadfq", 2), ("zaq", 6)])
def test_ranges_are_observed_then_frozen(method, observations_per_iter, warmup):
    iters = 3
    # ZAQ's Q learning rate of 0.1 blows up this tiny Q's BatchNorm statistics; the test is about ranges.
    engine = make_engine(
        make_config(method, train__observe_epochs=2, train__epochs=4, train__warmup_epochs=warmup, train__q_lr=1e-3)
    )
    bar = quiet_bar()
    assert set(ranges(engine.student)) == {"relu.act_quantizer", "layer1.2.act_quantizer", "layer2.2.act_quantizer"}
    snapshots = [ranges(engine.student)]
    for epoch in range(4):
        engine._run_epoch(epoch, bar)
        snapshots.append(ranges(engine.student))
        assert modes(engine.student) == {ActMode.OBSERVE if epoch < 2 else ActMode.FROZEN}
    # Observation: every Q forward on generated data (the G step's when G sees Q, and each Q step's).
    for name, (_, hi, n) in snapshots[1].items():
        assert n == observations_per_iter * iters and hi > 0, name
    for name, (_, hi, n) in snapshots[2].items():
        assert n == 2 * observations_per_iter * iters, name
        if method != "zaq":  # EMA ranges move with every batch; running min/max (ZAQ) only grows
            assert hi != snapshots[1][name][1], name
    # Frozen: nothing changes, although Q trains (from epoch `warmup` on).
    assert snapshots[3] == snapshots[2] == snapshots[4]


def test_q_trains_with_the_frozen_ranges():
    engine = make_engine(make_config("gdfq", train__observe_epochs=1, train__epochs=2, train__warmup_epochs=0))
    bar = quiet_bar()
    engine._run_epoch(0, bar)
    frozen = ranges(engine.student)
    before = {n: p.detach().clone() for n, p in engine.student.named_parameters()}
    engine._run_epoch(1, bar)
    assert ranges(engine.student) == frozen
    assert any(not torch.equal(p, before[n]) for n, p in engine.student.named_parameters())


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("method", ["adadfq", "adasg"])
def test_generator_gets_gradients_through_q_ste(method, monkeypatch):
    engine = make_engine(make_config(method, train__warmup_epochs=0))
    # Remove every teacher term: the only path from the loss to G is through Q.
    monkeypatch.setattr(engine.method, "generator_loss", lambda out: {"loss": out.q_logits.square().mean()})
    out, _ = engine._generator_step()
    assert out.q_logits is not None and out.q_logits.requires_grad
    g = dict(engine.generator.named_parameters())
    for name in ("l1.weight", "conv1.weight", "conv3.weight", "label_emb.weight"):
        assert g[name].grad is not None and g[name].grad.abs().sum() > 0, name
    # Q's own weights get no gradient from the G step (they are switched off), and come back on.
    for name, p in engine.student.named_parameters():
        assert p.grad is None, name
        assert p.requires_grad, name
    assert all(p.grad is None for p in engine.teacher.parameters())


def test_gdfq_generator_step_does_not_run_q(monkeypatch):
    engine = make_engine(make_config("gdfq"))
    calls = []
    monkeypatch.setattr(engine, "_student_forward", lambda x: calls.append(x) or (None, []))
    out, _ = engine._generator_step()
    assert out.q_logits is None and not calls
    assert out.bns is not None and float(out.bns.detach()) > 0


# ------------------------------------------------------------------ evaluation
@pytest.mark.parametrize("method", ["adadfq", "zaq"])
def test_evaluation_sees_frozen_ranges_and_restores_modes(method):
    g = torch.Generator().manual_seed(5)
    real = [(10.0 * torch.randn(6, *INPUT, generator=g), torch.randint(10, (6,), generator=g)) for _ in range(2)]
    seen = []

    def evaluate(model):
        before = ranges(model)
        bn_stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
        seen.append(modes(model))
        result = evaluate_batches(model, real, progress=False)  # real data, far outside the generated range
        assert ranges(model) == before, "real data moved the activation ranges"
        for k, v in model.state_dict().items():
            if "running" in k:
                assert torch.equal(v, bn_stats[k]), f"real data moved {k}"
        return result

    engine = make_engine(make_config(method, train__observe_epochs=2, train__epochs=2), evaluate=evaluate)
    training = engine.student.training
    bar = quiet_bar()
    engine._run_epoch(0, bar)  # inside the observation window
    assert seen == [{ActMode.FROZEN}]
    assert modes(engine.student) == {ActMode.OBSERVE}, "observation modes not restored after evaluation"
    assert engine.student.training == training == (method == "zaq")
    engine._run_epoch(1, bar)
    assert seen == [{ActMode.FROZEN}, {ActMode.FROZEN}]
    assert modes(engine.student) == {ActMode.OBSERVE}


def test_evaluation_sees_the_saved_layout_and_training_stays_channels_last():
    """The reported top-1 is the saved model's: in channels-last a few images flip at code boundaries."""
    layouts = []

    def evaluate(model):
        conv = model.conv1
        layouts.append(conv.weight.is_contiguous())
        return evaluate_batches(model, [(torch.randn(4, *INPUT), torch.zeros(4, dtype=torch.long))], progress=False)

    engine = make_engine(make_config("gdfq", train__epochs=1), evaluate=evaluate)
    engine._run_epoch(0, quiet_bar())
    assert layouts == [True]
    assert engine.student.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not engine.student.conv1.weight.is_contiguous()


def test_evaluation_failure_still_restores_modes():
    def broken(model):
        raise RuntimeError("test set unreadable")

    engine = make_engine(make_config("gdfq", train__epochs=1), evaluate=broken)
    with pytest.raises(RuntimeError, match="unreadable"):
        engine.run()
    assert modes(engine.student) == {ActMode.OBSERVE}


def test_eval_every():
    fake = FakeEvaluator([1.0, 2.0, 3.0])
    engine = make_engine(
        make_config("gdfq", train__epochs=3, train__iters_per_epoch=1, train__eval_every=2), evaluate=fake
    )
    _, summary = engine.run()
    assert len(fake.seen) == 2  # after epoch 1 and after the last epoch
    assert (summary["top1"], summary["top1_best"], summary["best_epoch"]) == (2.0, 2.0, 2)


# ------------------------------------------------------------------ ZAQ vs GDFQ/AdaDFQ specifics
def _count_calls(monkeypatch, engine, log):
    student_loss, generator_loss = engine.method.student_loss, engine.method.generator_loss

    def counted_student(out):
        log.append("q")
        return student_loss(out)

    def counted_generator(out):
        log.append("g")
        return generator_loss(out)

    monkeypatch.setattr(engine.method, "student_loss", counted_student)
    monkeypatch.setattr(engine.method, "generator_loss", counted_generator)


def test_zaq_five_student_steps_first_and_batch_statistics(monkeypatch):
    engine = make_engine(make_config("zaq", train__epochs=1, train__iters_per_epoch=2, train__warmup_epochs=0))
    log: list[str] = []
    _count_calls(monkeypatch, engine, log)
    assert engine.student.training
    assert all(m.training for m in engine.student.modules() if isinstance(m, nn.BatchNorm2d))
    engine.run()
    assert log == ["q"] * 5 + ["g"] + ["q"] * 5 + ["g"]
    # Q's BatchNorm used (and tracked) batch statistics of generated data.
    t_state, q_state = engine.teacher.state_dict(), engine.student.state_dict()
    assert not torch.equal(q_state["bn1.running_mean"], t_state["bn1.running_mean"])
    assert int(q_state["bn1.num_batches_tracked"]) > 0


@pytest.mark.parametrize("method", ["gdfq", "adadfq", "adasg"])
def test_gdfq_and_adadfq_one_student_step_with_fixed_bn(method, monkeypatch):
    engine = make_engine(make_config(method, train__epochs=1, train__iters_per_epoch=2, train__warmup_epochs=0))
    log: list[str] = []
    _count_calls(monkeypatch, engine, log)
    assert not engine.student.training
    engine.run()
    assert log == ["g", "q", "g", "q"]
    t_state, q_state = engine.teacher.state_dict(), engine.student.state_dict()
    for key in t_state:
        if "running" in key or "num_batches" in key:
            assert torch.equal(q_state[key], t_state[key]), key  # pretrained BN statistics, never updated
    assert not engine.student.training


def test_student_step_uses_the_teacher_logits_of_the_generator_batch(monkeypatch):
    """GDFQ lineage: Q trains on G's batch (detached) with P's logits from before the G update."""
    engine = make_engine(make_config("gdfq", train__warmup_epochs=0))
    seen = {}
    original = engine.method.student_loss

    def student_loss(out):
        seen["out"] = out
        return original(out)

    monkeypatch.setattr(engine.method, "student_loss", student_loss)
    batch, _ = engine._generator_step()
    engine._student_step(batch, True)
    out = seen["out"]
    assert torch.equal(out.x, batch.x.detach()) and not out.x.requires_grad
    assert torch.equal(out.p_logits, batch.p_logits) and not out.p_logits.requires_grad
    assert torch.equal(out.y, batch.y)


# ------------------------------------------------------------------ resume
@pytest.mark.parametrize(("method", "ema_decay"), [("adadfq", 0.0), ("zaq", 0.0), ("adadfq", 0.7)])
def test_resume_is_bit_identical(method, ema_decay, tmp_path):
    config = make_config(
        method, train__epochs=4, train__warmup_epochs=1, train__observe_epochs=2, train__ema_decay=ema_decay
    )
    g = torch.Generator().manual_seed(9)
    real = [(torch.randn(16, *INPUT, generator=g), torch.randint(10, (16,), generator=g))]

    def evaluate(model):
        return evaluate_batches(model, real, progress=False)

    # A: uninterrupted.
    engine_a = make_engine(config, run_dir=tmp_path / "a", evaluate=evaluate)
    _, summary_a = engine_a.run()

    # B: the same run, killed during epoch 2's evaluation (after epoch 1's checkpoint).
    calls = []

    def crashing(model):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return evaluate(model)

    with pytest.raises(KeyboardInterrupt):
        make_engine(config, run_dir=tmp_path / "b", evaluate=crashing).run()
    assert read_train_checkpoint(tmp_path / "b")["epoch"] == 2
    assert len(read_metrics(tmp_path / "b")) == 2

    # Resume in a fresh engine with a different global RNG state: everything must come from the checkpoint.
    engine_b = make_engine(config, run_dir=tmp_path / "b", evaluate=evaluate, torch_seed=999)
    _, summary_b = engine_b.run(resume=True)

    for name, module_a, module_b in [
        ("Q", engine_a.student, engine_b.student),
        ("G", engine_a.generator, engine_b.generator),
    ]:
        state_a, state_b = module_a.state_dict(), module_b.state_dict()
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), f"{name} {key} differs after resume"
    for opt_a, opt_b in [(engine_a.q_opt, engine_b.q_opt), (engine_a.g_opt, engine_b.g_opt)]:
        for sa, sb in zip(opt_a.state.values(), opt_b.state.values(), strict=True):
            for key in sa:
                assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), key
    assert torch.equal(engine_a.samplers[0].get_state(), engine_b.samplers[0].get_state())

    drop = {"seconds", "train_seconds"}
    assert {k: v for k, v in summary_a.items() if k not in drop} == {
        k: v for k, v in summary_b.items() if k not in drop
    }
    metrics_a, metrics_b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["epoch"] for r in metrics_b] == [0, 1, 2, 3]
    assert [{k: v for k, v in r.items() if k not in drop} for r in metrics_a] == [
        {k: v for k, v in r.items() if k not in drop} for r in metrics_b
    ]


def test_resume_redoes_the_epochs_after_the_last_checkpoint(tmp_path):
    """checkpoint_every=2, killed during epoch 3: epoch 2 is redone, and logged once, identically."""
    config = make_config("gdfq", train__epochs=4, train__iters_per_epoch=2, train__checkpoint_every=2)
    calls = []

    def crashing(model):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return {"top1": float(len(calls))}

    with pytest.raises(KeyboardInterrupt):
        make_engine(config, run_dir=tmp_path, evaluate=crashing).run()
    assert read_train_checkpoint(tmp_path)["epoch"] == 2
    before = read_metrics(tmp_path)
    assert [r["epoch"] for r in before] == [0, 1, 2]

    engine = make_engine(config, run_dir=tmp_path, evaluate=lambda m: {"top1": 3.0}, torch_seed=7)
    _, summary = engine.run(resume=True)
    after = read_metrics(tmp_path)
    assert [r["epoch"] for r in after] == [0, 1, 2, 3]
    redone = {k: v for k, v in after[2].items() if k != "train_seconds"}
    assert redone == {k: v for k, v in before[2].items() if k != "train_seconds"}
    # The history comes from the checkpoint (epochs 0, 1), then the redone epochs.
    assert [h["epoch"] for h in engine.state.history] == [0, 1, 2, 3]
    assert (summary["top1_best"], summary["best_epoch"]) == (3.0, 2)


def test_resume_without_evaluation_reports_no_stale_top1(tmp_path):
    """A run resumed without --data keeps its old evaluations as history, but "top1" must be the final model's."""
    config = make_config("gdfq", train__epochs=3, train__iters_per_epoch=2)
    calls = []

    def crashing(model):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {"top1": 42.0}

    with pytest.raises(KeyboardInterrupt):
        make_engine(config, run_dir=tmp_path, evaluate=crashing).run()
    _, summary = make_engine(config, run_dir=tmp_path).run(resume=True)
    assert "top1" not in summary
    assert (summary["top1_best"], summary["best_epoch"]) == (42.0, 0)


def test_resume_rejects_a_different_config(tmp_path):
    make_engine(make_config("gdfq", train__epochs=1), run_dir=tmp_path).run()
    other = make_engine(make_config("gdfq", train__epochs=1, train__q_lr=0.5), run_dir=tmp_path)
    with pytest.raises(DFQError, match="different configuration"):
        other.run(resume=True)


# ------------------------------------------------------------------ batch size, schedule
@pytest.mark.parametrize("batch_size", [8, 12])
def test_adadfq_any_batch_size(batch_size):
    config = make_config("adadfq", train__batch_size=batch_size, train__epochs=1, train__iters_per_epoch=2)
    engine = make_engine(config)
    out, losses = engine._generator_step()
    assert out.x.shape == (batch_size, *INPUT)
    assert all(torch.isfinite(v) for v in losses.values())
    _, summary = engine.run()
    assert summary["batch_size"] == batch_size


def test_lr_schedule():
    lrs = [Engine._lr(1e-3, [2, 4], 0.1, epoch) for epoch in range(5)]
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5], rel=1e-12)
    # The papers' milestones [100, 200, 300]: decays at 0-based epochs 100, 200, 300.
    assert Engine._lr(1e-4, [100, 200, 300], 0.1, 99) == 1e-4
    assert Engine._lr(1e-4, [100, 200, 300], 0.1, 100) == pytest.approx(1e-5)
    assert Engine._lr(1e-4, [100, 200, 300], 0.1, 399) == pytest.approx(1e-7)


# ------------------------------------------------------------------ known bug
def test_zaq_with_functional_relus():
    engine = make_engine(
        make_config("zaq", train__epochs=1, train__iters_per_epoch=1), teacher=make_teacher(FunctionalReluNet)
    )
    engine.run()


# ------------------------------------------------------------------ average of Q's weights
def _record_q_steps(engine) -> list[list[torch.Tensor]]:
    """Q's parameters after every optimizer step of ``engine``, appended as it trains."""
    trajectory: list[list[torch.Tensor]] = []
    step = engine.q_opt.step

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        trajectory.append([p.detach().clone() for p in engine.student.parameters()])
        return out

    engine.q_opt.step = recording_step
    return trajectory


@pytest.mark.parametrize("method", ["gdfq", "adasg", "adadfq"])
def test_ema_averages_q_after_every_step_and_is_what_is_evaluated_and_returned(method):
    """train.ema_decay: avg = w_1 after Q's first step, then avg <- avg + (1 - d)(w_k - avg) after each step
    (the shared-forward Q step of AdaSG/AdaDFQ included); evaluations and the returned Q see the average."""
    decay = 0.6
    engine = make_engine(make_config(method, train__ema_decay=decay), evaluate=None)
    trajectory = _record_q_steps(engine)
    seen = []
    engine.evaluate = lambda model: seen.append(model.fc.weight.detach().clone()) or {"top1": 0.0}
    q, _ = engine.run()
    assert len(trajectory) == 3  # one epoch of Q training
    expected = [w.clone() for w in trajectory[0]]
    for weights in trajectory[1:]:
        for avg, w in zip(expected, weights, strict=True):
            avg.lerp_(w, 1 - decay)
    last = trajectory[-1]
    for p, avg in zip(q.parameters(), expected, strict=True):
        assert torch.equal(p.detach(), avg)
    assert not all(torch.equal(avg, w) for avg, w in zip(expected, last, strict=True))
    fc = [n for n, _ in q.named_parameters()].index("fc.weight")
    assert torch.equal(seen[-1], expected[fc])  # the last evaluation scored the returned weights


def test_evaluating_the_average_leaves_training_on_q_own_weights():
    """Evaluations swap the average in and Q's own weights back: training with an evaluation after every
    epoch follows exactly the trajectory of training without any."""
    config = make_config("adadfq", train__epochs=4, train__ema_decay=0.5)
    quiet = make_engine(config)
    evaluated = make_engine(config, evaluate=lambda model: {"top1": 0.0})
    trajectories = [_record_q_steps(e) for e in (quiet, evaluated)]
    q_quiet, _ = quiet.run()
    q_evaluated, _ = evaluated.run()
    assert len(trajectories[1]) == 9  # three epochs of Q training, evaluated after each one
    for a, b in zip(*trajectories, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(q_quiet.parameters(), q_evaluated.parameters(), strict=True))


def test_without_ema_q_is_the_last_iterate():
    engine = make_engine(make_config("adadfq"))
    trajectory = _record_q_steps(engine)
    q, _ = engine.run()
    assert engine.ema is None
    assert all(torch.equal(p.detach(), w) for p, w in zip(q.parameters(), trajectory[-1], strict=True))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train__ema_decay": 1.0}, "ema_decay must be in"),
        ({"train__ema_decay": -0.1}, "ema_decay must be in"),
        ({"train__ema_decay": 0.9, "plugins__lsq": True}, "ema_decay averages Q's weights"),
        ({"train__ema_decay": 0.9, "method": "zaq"}, "trains Q's BatchNorm statistics"),
    ],
)
def test_ema_refusals(overrides, message):
    method = overrides.pop("method", "adadfq")
    with pytest.raises(DFQError, match=message):
        make_engine(make_config(method, train__epochs=3, **overrides))
