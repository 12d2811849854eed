"""The training loop of the generator-based methods on the tiny classifier of :mod:`dfq.testing`
(docs/methods.md): the game's data flow, its schedules and its persistence, not accuracy.
Everything goes through the public :class:`~dfq.train.Trainer` and :class:`~dfq.train.Game`, the method
objects and the run directory's files."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from dfq.config import resolve_config
from dfq.errors import DFQError
from dfq.evaluate import evaluate as evaluate_batches
from dfq.quant import ActMode, act_quantizers
from dfq.testing import INPUT_SIZE, FunctionalReluNet, tiny_classifier, tiny_config, tiny_game, tiny_trainer
from dfq.train import TRAIN_CHECKPOINT, multistep_lr, read_train_checkpoint
from dfq.train.average import NoAverage

METHODS = ["gdfq", "zaq", "adasg", "adadfq"]
LOGGED = {
    "gdfq": {"g_loss", "g_ce", "g_bns", "q_loss", "q_kd", "q_ce"},
    "adasg": {"g_loss", "g_bg", "g_ds", "g_as", "g_bns", "g_h_norm", "q_loss"},
    "adadfq": {"g_loss", "g_bg", "g_ds", "g_as", "g_bns", "g_h_norm", "q_loss"},
    "zaq": {"g_loss", "g_l1", "g_scrm", "g_act", "q_loss", "q_l1", "q_scrm"},
}


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def ranges(model: nn.Module) -> dict[str, tuple[float, float, int]]:
    return {n: (float(q.lo), float(q.hi), int(q.num_updates)) for n, q in act_quantizers(model)}


def modes(model: nn.Module) -> set[ActMode]:
    return {q.get_mode() for _, q in act_quantizers(model)}


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_state(a: nn.Module, b: nn.Module, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), what
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{what} {k} differs"


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
    config = tiny_config(method, train__q_milestones=[1], train__g_milestones=[1])
    fake = FakeEvaluator([50.0, 20.0])
    trainer = tiny_trainer(config, run_dir=tmp_path, evaluate=fake)
    q, summary = trainer.run()

    assert q is trainer.game.student
    assert summary["method"] == method and summary["epochs"] == 2 and summary["batch_size"] == 4
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
    t = config.method.train
    assert records[0]["q_lr"] == pytest.approx(t.q_lr) and records[1]["q_lr"] == pytest.approx(t.q_lr * 0.1)
    assert records[0]["g_lr"] == pytest.approx(t.g_lr) and records[1]["g_lr"] == pytest.approx(t.g_lr * 0.1)

    ckpt = read_train_checkpoint(tmp_path)
    assert (tmp_path / TRAIN_CHECKPOINT).is_file()
    assert ckpt["epoch"] == 2 and [h["top1"] for h in ckpt["history"]] == [50.0, 20.0]
    assert modes(q) == {ActMode.FROZEN}
    assert q.conv1.weight.is_contiguous()  # an ordinary model, in the layout it is saved in


def test_methods_get_their_generators_and_paper_defaults():
    for method in ("gdfq", "adadfq"):
        game = tiny_game(method)
        assert type(game.generator).__name__ == "CifarGenerator" and game.generator.latent_dim == 100
    game = tiny_game("zaq")
    assert type(game.generator).__name__ == "UnconditionalGenerator" and game.generator.latent_dim == 256
    assert game.features == ["layer1", "layer2"]  # auto-detected stages of a model outside the zoo
    z = resolve_config(None, {"method.name": "zaq"}).method.train  # the papers' schedules, not the short one
    assert (z.q_lr, z.q_nesterov, z.q_weight_decay, z.g_betas, z.warmup_epochs) == (0.1, False, 5e-4, [0.9, 0.999], 0)
    g = resolve_config(None, {"method.name": "gdfq"}).method.train
    assert (g.batch_size, g.q_lr, g.q_nesterov, g.g_betas, g.warmup_epochs) == (200, 1e-4, True, [0.5, 0.999], 4)


# ------------------------------------------------------------------ warm-up
@pytest.mark.parametrize("method", ["gdfq", "adadfq", "zaq"])
def test_warmup_trains_only_the_generator(method, tmp_path):
    trainer = tiny_trainer(tiny_config(method, train__warmup_epochs=2), run_dir=tmp_path)
    game = trainer.game
    q_params = {n: p.detach().clone() for n, p in game.student.named_parameters()}
    g_before = clone_state(game.generator)
    trainer.run()
    for n, p in game.student.named_parameters():
        assert torch.equal(p, q_params[n]), f"Q parameter {n} moved during warm-up"
    g_after = game.generator.state_dict()
    assert not torch.equal(g_after["l1.weight"], g_before["l1.weight"])
    assert not torch.equal(g_after["conv3.weight"], g_before["conv3.weight"])
    metrics = read_metrics(tmp_path)
    assert [r["train_q"] for r in metrics] == [False, False]
    # As in the official loops, Q's loss is computed (not stepped) during warm-up; AdaSG/AdaDFQ, whose G step
    # already ran Q, skip that forward once the ranges are frozen (observe_epochs = 1 here).
    assert math.isfinite(metrics[0]["q_loss"])
    if method in ("gdfq", "zaq"):
        assert math.isfinite(metrics[1]["q_loss"])
    else:
        assert "q_loss" not in metrics[1]


# ------------------------------------------------------------------ activation ranges
@pytest.mark.parametrize("warmup", [0, 3])  # ranges are observed alike whether Q trains or not
@pytest.mark.parametrize(("method", "observations_per_iter"), [("gdfq", 1), ("adadfq", 2), ("zaq", 6)])
def test_ranges_are_observed_then_frozen(method, observations_per_iter, warmup):
    iters = 2
    # ZAQ's Q learning rate of 0.1 blows up this tiny Q's BatchNorm statistics; the test is about ranges.
    trainer = tiny_trainer(tiny_config(method, train__observe_epochs=2, train__epochs=4, train__warmup_epochs=warmup,
                                       train__q_lr=1e-3, train__iters_per_epoch=iters))  # fmt: skip
    q = trainer.game.student
    assert set(ranges(q)) == {"relu.act_quantizer", "layer1.2.act_quantizer", "layer2.2.act_quantizer"}
    snapshots = [ranges(q)]
    for epoch in range(4):
        trainer.train_epoch()
        snapshots.append(ranges(q))
        assert modes(q) == {ActMode.OBSERVE if epoch < 2 else ActMode.FROZEN}
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
    trainer = tiny_trainer(tiny_config("gdfq", train__warmup_epochs=0))
    q = trainer.game.student
    trainer.train_epoch()
    frozen = ranges(q)
    before = {n: p.detach().clone() for n, p in q.named_parameters()}
    trainer.train_epoch()
    assert ranges(q) == frozen
    assert any(not torch.equal(p, before[n]) for n, p in q.named_parameters())


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("method", ["adadfq", "adasg"])
def test_generator_gets_gradients_through_q_ste(method, monkeypatch):
    game = tiny_game(tiny_config(method, train__warmup_epochs=0))
    # Remove every teacher term: the only path from the loss to G is through Q.
    monkeypatch.setattr(game.method, "generator_loss", lambda out: {"loss": out.q_logits.square().mean()})
    out, _ = game.generator_step()
    assert out.q_logits is not None and out.q_logits.requires_grad
    g = dict(game.generator.named_parameters())
    for name in ("l1.weight", "conv1.weight", "conv3.weight", "label_emb.weight"):
        assert g[name].grad is not None and g[name].grad.abs().sum() > 0, name
    # Q's own weights get no gradient from the G step (they are switched off), and come back on.
    for name, p in game.student.named_parameters():
        assert p.grad is None, name
        assert p.requires_grad, name
    assert all(p.grad is None for p in game.teacher.parameters())


def test_gdfq_generator_step_does_not_run_q(monkeypatch):
    game = tiny_game("gdfq")
    calls = []
    monkeypatch.setattr(game, "student_forward", lambda x: calls.append(x) or (None, []))
    out, _ = game.generator_step()
    assert out.q_logits is None and not calls


# ------------------------------------------------------------------ evaluation
@pytest.mark.parametrize("method", ["gdfq", "zaq"])
def test_evaluation_freezes_ranges_and_leaves_q_as_it_was(method):
    """Real data never moves Q's ranges or BatchNorm statistics; Q observes and trains on afterwards."""
    seen = []

    def evaluate(model):
        bn_stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
        seen.append(modes(model))
        result = evaluate_batches(model, [(torch.randn(4, *INPUT_SIZE), torch.zeros(4, dtype=torch.long))],
                                  progress=False)  # fmt: skip
        for k, v in model.state_dict().items():
            if "running" in k:
                assert torch.equal(v, bn_stats[k]), f"real data moved {k}"
        return result

    trainer = tiny_trainer(tiny_config(method, train__observe_epochs=2), evaluate=evaluate)
    q = trainer.game.student
    training = q.training
    trainer.train_epoch()  # inside the observation window
    assert seen == [{ActMode.FROZEN}]
    assert modes(q) == {ActMode.OBSERVE}, "observation modes not restored after evaluation"
    assert q.training == training == (method == "zaq")
    trainer.train_epoch()
    assert seen == [{ActMode.FROZEN}, {ActMode.FROZEN}]
    assert modes(q) == {ActMode.OBSERVE}


def test_evaluation_sees_the_saved_layout_and_training_stays_channels_last():
    """The reported top-1 is the saved model's: in channels-last a few images flip at code boundaries."""
    layouts = []

    def evaluate(model):
        layouts.append(model.conv1.weight.is_contiguous())
        return {"top1": 0.0}

    trainer = tiny_trainer(tiny_config("gdfq", train__epochs=1), evaluate=evaluate)
    trainer.train_epoch()
    q = trainer.game.student
    assert layouts == [True]
    assert q.conv1.weight.is_contiguous(memory_format=torch.channels_last) and not q.conv1.weight.is_contiguous()


def test_evaluation_failure_still_restores_modes():
    def broken(model):
        raise RuntimeError("test set unreadable")

    trainer = tiny_trainer(tiny_config("gdfq", train__epochs=1), evaluate=broken)
    with pytest.raises(RuntimeError, match="unreadable"):
        trainer.run()
    assert modes(trainer.game.student) == {ActMode.OBSERVE}


def test_eval_every():
    fake = FakeEvaluator([1.0, 2.0, 3.0])
    trainer = tiny_trainer(tiny_config("gdfq", train__epochs=3, train__iters_per_epoch=1, train__eval_every=2),
                           evaluate=fake)  # fmt: skip
    _, summary = trainer.run()
    assert len(fake.seen) == 2  # after epoch 1 and after the last epoch
    assert (summary["top1"], summary["top1_best"], summary["best_epoch"]) == (2.0, 2.0, 2)


# ------------------------------------------------------------------ the order of the steps
def _count_calls(monkeypatch, method, log):
    student_loss, generator_loss = method.student_loss, method.generator_loss
    monkeypatch.setattr(method, "student_loss", lambda out: log.append("q") or student_loss(out))
    monkeypatch.setattr(method, "generator_loss", lambda out: log.append("g") or generator_loss(out))


def test_zaq_five_student_steps_first_and_batch_statistics(monkeypatch):
    trainer = tiny_trainer(tiny_config("zaq", train__epochs=1, train__warmup_epochs=0))
    game, log = trainer.game, []
    _count_calls(monkeypatch, game.method, log)
    assert game.student.training
    assert all(m.training for m in game.student.modules() if isinstance(m, nn.BatchNorm2d))
    trainer.run()
    assert log == ["q"] * 5 + ["g"] + ["q"] * 5 + ["g"]
    # Q's BatchNorm used (and tracked) batch statistics of generated data.
    t_state, q_state = game.teacher.state_dict(), game.student.state_dict()
    assert not torch.equal(q_state["bn1.running_mean"], t_state["bn1.running_mean"])
    assert int(q_state["bn1.num_batches_tracked"]) > 0


@pytest.mark.parametrize("method", ["gdfq", "adadfq", "adasg"])
def test_gdfq_and_adadfq_one_student_step_with_fixed_bn(method, monkeypatch):
    trainer = tiny_trainer(tiny_config(method, train__epochs=1, train__warmup_epochs=0))
    game, log = trainer.game, []
    _count_calls(monkeypatch, game.method, log)
    assert not game.student.training
    trainer.run()
    assert log == ["g", "q", "g", "q"]
    t_state, q_state = game.teacher.state_dict(), game.student.state_dict()
    for key in t_state:
        if "running" in key or "num_batches" in key:
            assert torch.equal(q_state[key], t_state[key]), key  # pretrained BN statistics, never updated
    assert not game.student.training


def test_student_step_uses_the_teacher_logits_of_the_generator_batch(monkeypatch):
    """GDFQ lineage: Q trains on G's batch (detached) with P's logits from before the G update."""
    game = tiny_game(tiny_config("gdfq", train__warmup_epochs=0))
    seen = {}
    original = game.method.student_loss
    monkeypatch.setattr(game.method, "student_loss", lambda out: seen.setdefault("out", out) and original(out))
    batch, _ = game.generator_step()
    game.student_step(batch, True)
    out = seen["out"]
    assert torch.equal(out.x, batch.x.detach()) and not out.x.requires_grad
    assert torch.equal(out.p_logits, batch.p_logits) and not out.p_logits.requires_grad
    assert torch.equal(out.y, batch.y)


# ------------------------------------------------------------------ resume
@pytest.mark.parametrize(("method", "ema_decay"), [("adadfq", 0.0), ("zaq", 0.0), ("adadfq", 0.7)])
def test_resume_is_bit_identical(method, ema_decay, tmp_path):
    config = tiny_config(method, train__epochs=4, train__observe_epochs=2, train__ema_decay=ema_decay)
    g = torch.Generator().manual_seed(9)
    real = [(torch.randn(16, *INPUT_SIZE, generator=g), torch.randint(10, (16,), generator=g))]

    def evaluate(model):
        return evaluate_batches(model, real, progress=False)

    # A: uninterrupted.
    a = tiny_trainer(config, run_dir=tmp_path / "a", evaluate=evaluate)
    _, summary_a = a.run()

    # B: the same run, killed during epoch 2's evaluation (after epoch 1's checkpoint).
    calls = []

    def crashing(model):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return evaluate(model)

    with pytest.raises(KeyboardInterrupt):
        tiny_trainer(config, run_dir=tmp_path / "b", evaluate=crashing).run()
    assert read_train_checkpoint(tmp_path / "b")["epoch"] == 2
    assert len(read_metrics(tmp_path / "b")) == 2

    # Resume in a fresh trainer built from another global random state: everything must come from the checkpoint.
    b = tiny_trainer(config, run_dir=tmp_path / "b", evaluate=evaluate, global_seed=999)
    _, summary_b = b.run(resume=True)

    assert_same_state(a.game.student, b.game.student, "Q")
    assert_same_state(a.game.generator, b.game.generator, "G")
    for opt_a, opt_b in [(a.game.q_opt, b.game.q_opt), (a.game.g_opt, b.game.g_opt)]:
        for sa, sb in zip(opt_a.state.values(), opt_b.state.values(), strict=True):
            for key in sa:
                assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), key
    assert torch.equal(a.game.streams.state(), b.game.streams.state())

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
    config = tiny_config("gdfq", train__epochs=4, train__checkpoint_every=2)
    calls = []

    def crashing(model):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return {"top1": float(len(calls))}

    with pytest.raises(KeyboardInterrupt):
        tiny_trainer(config, run_dir=tmp_path, evaluate=crashing).run()
    assert read_train_checkpoint(tmp_path)["epoch"] == 2
    before = read_metrics(tmp_path)
    assert [r["epoch"] for r in before] == [0, 1, 2]

    trainer = tiny_trainer(config, run_dir=tmp_path, evaluate=lambda m: {"top1": 3.0}, global_seed=7)
    _, summary = trainer.run(resume=True)
    after = read_metrics(tmp_path)
    assert [r["epoch"] for r in after] == [0, 1, 2, 3]
    redone = {k: v for k, v in after[2].items() if k != "train_seconds"}
    assert redone == {k: v for k, v in before[2].items() if k != "train_seconds"}
    # The history comes from the checkpoint (epochs 0, 1), then the redone epochs.
    assert [h["epoch"] for h in trainer.state.history] == [0, 1, 2, 3]
    assert (summary["top1_best"], summary["best_epoch"]) == (3.0, 2)


def test_resume_without_evaluation_reports_no_stale_top1(tmp_path):
    """A run resumed without --data keeps its old evaluations as history, but "top1" must be the final model's."""
    config = tiny_config("gdfq", train__epochs=3)
    calls = []

    def crashing(model):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {"top1": 42.0}

    with pytest.raises(KeyboardInterrupt):
        tiny_trainer(config, run_dir=tmp_path, evaluate=crashing).run()
    _, summary = tiny_trainer(config, run_dir=tmp_path).run(resume=True)
    assert "top1" not in summary
    assert (summary["top1_best"], summary["best_epoch"]) == (42.0, 0)


def test_resume_rejects_a_different_config_or_nothing_to_resume(tmp_path):
    with pytest.raises(DFQError, match="nothing to resume"):
        tiny_trainer("gdfq", run_dir=tmp_path).run(resume=True)
    tiny_trainer(tiny_config("gdfq", train__epochs=1), run_dir=tmp_path).run()
    other = tiny_trainer(tiny_config("gdfq", train__epochs=1, train__q_lr=0.5), run_dir=tmp_path)
    with pytest.raises(DFQError, match="different configuration"):
        other.run(resume=True)


# ------------------------------------------------------------------ batch size, schedule
@pytest.mark.parametrize("batch_size", [4, 6])
def test_adadfq_any_batch_size(batch_size):
    trainer = tiny_trainer(tiny_config("adadfq", train__batch_size=batch_size, train__epochs=1))
    out, losses = trainer.game.generator_step()
    assert out.x.shape == (batch_size, *INPUT_SIZE)
    assert all(torch.isfinite(v) for v in losses.values())
    _, summary = trainer.run()
    assert summary["batch_size"] == batch_size


def test_lr_schedule():
    lrs = [multistep_lr(1e-3, [2, 4], 0.1, epoch) for epoch in range(5)]
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5], rel=1e-12)
    # The papers' milestones [100, 200, 300]: decays at 0-based epochs 100, 200, 300.
    assert multistep_lr(1e-4, [100, 200, 300], 0.1, 99) == 1e-4
    assert multistep_lr(1e-4, [100, 200, 300], 0.1, 100) == pytest.approx(1e-5)
    assert multistep_lr(1e-4, [100, 200, 300], 0.1, 399) == pytest.approx(1e-7)
    # base * gamma ** k, not MultiStepLR's base * gamma * gamma: the float value of today's runs.
    assert multistep_lr(1e-3, [1, 2], 0.1, 2) == 1e-3 * 0.1**2 != 1e-3 * 0.1 * 0.1


def test_zaq_with_functional_relus():
    """Known bug (fixed): quantize_model's fx rewrite must keep the stage names ZAQ reads its features from."""
    trainer = tiny_trainer(tiny_config("zaq", train__epochs=1, train__iters_per_epoch=1),
                           teacher=tiny_classifier(FunctionalReluNet))  # fmt: skip
    q, summary = trainer.run()
    assert trainer.game.features == ["layer1", "layer2"] and summary["epochs"] == 1
    assert all(torch.isfinite(t).all() for t in q.state_dict().values() if t.is_floating_point())


# ------------------------------------------------------------------ average of Q's weights
def _record_q_steps(game) -> list[list[torch.Tensor]]:
    """Q's parameters after every step of Q's optimizer, appended as it trains."""
    trajectory: list[list[torch.Tensor]] = []
    step = game.q_opt.step

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        trajectory.append([p.detach().clone() for p in game.student.parameters()])
        return out

    game.q_opt.step = recording_step
    return trajectory


@pytest.mark.parametrize("method", ["gdfq", "adasg", "adadfq"])
def test_ema_averages_q_after_every_step_and_is_what_is_evaluated_and_returned(method):
    """train.ema_decay: avg = w_1 after Q's first step, then avg <- avg + (1 - d)(w_k - avg) after each step
    (the shared-forward Q step of AdaSG/AdaDFQ included); evaluations and the returned Q see the average."""
    decay = 0.6
    seen = []
    trainer = tiny_trainer(
        tiny_config(method, train__ema_decay=decay, train__iters_per_epoch=3),
        evaluate=lambda model: seen.append(model.fc.weight.detach().clone()) or {"top1": 0.0},
    )
    trajectory = _record_q_steps(trainer.game)
    q, _ = trainer.run()
    assert len(trajectory) == 3  # one epoch of Q training
    expected = [w.clone() for w in trajectory[0]]
    for weights in trajectory[1:]:
        for avg, w in zip(expected, weights, strict=True):
            avg.lerp_(w, 1 - decay)
    for p, avg in zip(q.parameters(), expected, strict=True):
        assert torch.equal(p.detach(), avg)
    assert not all(torch.equal(avg, w) for avg, w in zip(expected, trajectory[-1], strict=True))
    fc = [n for n, _ in q.named_parameters()].index("fc.weight")
    assert torch.equal(seen[-1], expected[fc])  # the last evaluation scored the returned weights


def test_evaluating_the_average_leaves_training_on_q_own_weights():
    """Evaluations swap the average in and Q's own weights back: training with an evaluation after every
    epoch follows exactly the trajectory of training without any."""
    config = tiny_config("adadfq", train__epochs=3, train__ema_decay=0.5)
    quiet, evaluated = tiny_trainer(config), tiny_trainer(config, evaluate=lambda model: {"top1": 0.0})
    trajectories = [_record_q_steps(t.game) for t in (quiet, evaluated)]
    q_quiet, _ = quiet.run()
    q_evaluated, _ = evaluated.run()
    assert len(trajectories[1]) == 4  # two epochs of Q training, evaluated after each one
    for a, b in zip(*trajectories, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(q_quiet.parameters(), q_evaluated.parameters(), strict=True))


def test_without_ema_q_is_the_last_iterate():
    trainer = tiny_trainer("adadfq")
    trajectory = _record_q_steps(trainer.game)
    q, _ = trainer.run()
    assert isinstance(trainer.game.average, NoAverage) and trainer.snapshot()["ema"] is None
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
        tiny_trainer(tiny_config(method, train__epochs=3, **overrides))


@pytest.mark.parametrize("method", ["gdfq", "adadfq"])
def test_p_sees_the_images_q_sees_under_a_fixed_input_range(method):
    """Under the deploy protocol Q's input grid clips G's pixels to the valid range: P's targets and BatchNorm
    statistics come from the same clipped images, and G still learns through the pixels inside the range."""
    free = tiny_game(tiny_config(method, quant__protocol="deploy", train__warmup_epochs=0))
    batch, _ = free.generator_step()
    assert batch.x.abs().max() > 0.5  # G's images overshoot the range below
    game = tiny_game(tiny_config(method, quant__protocol="deploy", quant__input_range=[-0.5, 0.5],
                                 train__warmup_epochs=0))  # fmt: skip
    seen = []
    game.teacher.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    batch, _ = game.generator_step()
    assert seen and all(float(x.min()) >= -0.5 and float(x.max()) <= 0.5 for x in seen)
    assert float(batch.x.detach().max()) == 0.5 and float(batch.x.detach().min()) == -0.5
    assert torch.equal(batch.p_logits, game.teacher(batch.x).float())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in game.generator.parameters())
