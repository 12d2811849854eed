"""The plug-ins' configuration, resume and rollback with plug-ins on, and the plug-in registry."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from plugin_helpers import _lsq_trainer, assert_same_states, learned_keys, plugin
from torch import nn
from torch.testing import assert_close

from dfq.config import resolve_config
from dfq.errors import DFQError
from dfq.quant import act_quantizers
from dfq.testing import tiny_classifier, tiny_config, tiny_game, tiny_trainer
from dfq.train import read_train_checkpoint
from dfq.train.plugins import LearnedQuantizers, PluginConfig


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ============================================================== configuration
@pytest.mark.parametrize(
    "kwargs",
    [
        {"lowpass": -0.01},
        {"lowpass": 1.01},
        {"lowpass": float("nan")},
        {"hard_tau": -0.1},
        {"hard_tau": 1.5},
        {"hard_tau": float("nan")},
        {"hard_ce_weight": -1.0},
        {"cam_weight": -0.5},
        {"cam_weight": float("nan")},
        {"lr_astep": -1e-5},
        {"lr_wstep": -1e-5},
        {"lr_round": -1e-3},
        {"round_weight": -0.1},
        {"beta": (20.0,)},
        {"beta": (20.0, 2.0, 1.0)},
        {"beta": (0.0, 2.0)},
        {"beta": (20.0, -2.0)},
    ],
)
def test_plugin_config_rejects_bad_values(kwargs):
    with pytest.raises(DFQError, match="plugins\\."):
        PluginConfig(**kwargs)


def test_plugin_config_accepts_the_bounds():
    pc = PluginConfig(lowpass=1.0, hard_tau=0.0, hard_ce_weight=0.0, cam_weight=0.0, beta=[3, 1])
    assert pc.beta == (3.0, 1.0)
    assert PluginConfig(lowpass=0.0, hard_tau=1.0).hard_tau == 1.0
    assert not PluginConfig().learns_quantizers and not PluginConfig().changes_student_input
    assert PluginConfig(lsq=True).learns_quantizers and PluginConfig(adaround=True).learns_quantizers
    assert PluginConfig(lowpass=0.3).changes_student_input and PluginConfig(cam_weight=0.1).changes_student_input
    assert not PluginConfig(hard_tau=0.5).changes_student_input


def test_plugin_config_rejects_nan_beta():
    with pytest.raises(DFQError):
        PluginConfig(beta=(20.0, float("nan")))


def test_resolve_config_validates_plugins():
    with pytest.raises(DFQError, match=r"plugins\.lowpass"):
        resolve_config(None, {"method.name": "gdfq", "method.plugins.lowpass": 2.0})
    with pytest.raises(DFQError, match=r"plugins\.hard_tau"):
        resolve_config(None, {"method.name": "gdfq", "method.plugins.hard_tau": 1.5})
    with pytest.raises(DFQError, match=r"plugins\.beta"):
        resolve_config(None, {"method.name": "gdfq", "method.plugins.beta": [1.0]})
    with pytest.raises(DFQError, match="plugins"):
        resolve_config(None, {"method.name": "gdfq", "method.plugins.bogus": 1})
    c = resolve_config(None, {"method.name": "gdfq", "method.plugins.lowpass": 0.4, "method.plugins.beta": [10, 1]})
    assert c.method.plugins == PluginConfig(lowpass=0.4, beta=(10.0, 1.0))


def test_resolve_config_rejects_a_non_mapping_plugins_section():
    with pytest.raises(DFQError, match="plugins"):
        resolve_config(None, {"method.name": "gdfq", "method.plugins": "lsq"})


def test_resolve_config_stores_weight_scales_for_learned_steps():
    assert resolve_config(None, {"method.name": "gdfq"}).quant.weight_scales == "minmax"
    for name in ("lsq", "adaround"):
        key = f"method.plugins.{name}"
        assert resolve_config(None, {"method.name": "gdfq", key: True}).quant.weight_scales == "stored"
        preset = {"method": {"name": "gdfq", "plugins": {name: True}}}
        assert resolve_config(preset).quant.weight_scales == "stored"
        with pytest.raises(DFQError, match="weight_scales: stored"):  # an explicit minmax grid is refused
            resolve_config(None, {"method.name": "gdfq", key: True, "quant.weight_scales": "minmax"})
        with pytest.raises(DFQError, match="weight_scales: stored"):
            resolve_config({"quant": {"weight_scales": "minmax"}}, {"method.name": "gdfq", key: True})
    assert resolve_config(None, {"method.name": "gdfq", "method.plugins.lowpass": 0.5}).quant.weight_scales == "minmax"


@pytest.mark.parametrize("name", ["plugins__hard_tau", "plugins__cam_weight"])
def test_label_plugins_need_a_conditional_generator(name):
    with pytest.raises(DFQError, match="sampled labels"):
        tiny_game(tiny_config("zaq", **{name: 0.5}))
    game = tiny_game(tiny_config("zaq", plugins__lowpass=0.5))  # the filter needs no labels
    assert [type(p).__name__ for p in game.plugins.items] == ["LowPass"]


# ============================================================== resume and rollback
PLUGIN_SETS = {
    "lsq": {"plugins__lsq": True},
    "adaround": {"plugins__adaround": True},
    "all": {
        "plugins__lsq": True,
        "plugins__adaround": True,
        "plugins__cam_weight": 0.5,
        "plugins__lowpass": 0.5,
        "plugins__hard_tau": 0.9,
    },
}


@pytest.mark.parametrize("method", ["gdfq", "adadfq"])
@pytest.mark.parametrize("plugins", list(PLUGIN_SETS))
def test_resume_after_an_epoch_of_learning_is_bit_identical(method, plugins, tmp_path):
    config = tiny_config(method, train__epochs=3, **PLUGIN_SETS[plugins])
    ref = tiny_trainer(config, run_dir=tmp_path / "ref")
    ref.run()

    stopped = tiny_trainer(config, run_dir=tmp_path / "run")
    stopped.train_epoch()
    stopped.train_epoch()  # the first learning epoch
    ckpt = read_train_checkpoint(tmp_path / "run")
    assert (ckpt["epoch"], ckpt["iteration"]) == (2, 0) and ckpt["qp_opt"] is not None

    resumed = tiny_trainer(config, run_dir=tmp_path / "run", global_seed=999)
    resumed.run(resume=True)
    assert_same_states(resumed, ref)
    assert learned_keys(resumed.game.student) == []
    assert torch.equal(resumed.game.streams.state(), ref.game.streams.state())


@pytest.mark.parametrize("method", ["gdfq", "adadfq"])
@pytest.mark.parametrize("plugins", ["adaround", "all"])
def test_resume_mid_epoch_while_learning_is_bit_identical(method, plugins, tmp_path, monkeypatch):
    config = tiny_config(method, train__epochs=3, train__iters_per_epoch=3, train__checkpoint_every_iters=4,
                         **PLUGIN_SETS[plugins])  # fmt: skip
    ref = tiny_trainer(config, run_dir=tmp_path / "ref")
    ref.run()

    stopped = tiny_trainer(config, run_dir=tmp_path / "run")
    iteration, calls = stopped.game.method.iteration, []

    def crashing(game, train_q):
        calls.append(1)
        if len(calls) == 6:  # epoch 1, iteration 2: after the checkpoint at global iteration 4
            raise KeyboardInterrupt
        return iteration(game, train_q)

    monkeypatch.setattr(stopped.game.method, "iteration", crashing)
    with pytest.raises(KeyboardInterrupt):
        stopped.run()
    ckpt = read_train_checkpoint(tmp_path / "run")
    assert (ckpt["epoch"], ckpt["iteration"]) == (1, 1) and ckpt["qp_opt"] is not None
    assert any(k.endswith(".alpha") for k in ckpt["student"])

    resumed = tiny_trainer(config, run_dir=tmp_path / "run", global_seed=999)
    resumed.run(resume=True)
    assert_same_states(resumed, ref)


def test_resume_rejects_a_checkpoint_of_another_plugin_config(tmp_path):
    tiny_trainer(tiny_config("gdfq", train__epochs=3, plugins__lsq=True), run_dir=tmp_path).run()
    other = tiny_trainer(tiny_config("gdfq", train__epochs=3, plugins__adaround=True), run_dir=tmp_path)
    with pytest.raises(DFQError, match="different configuration"):
        other.run(resume=True)


@pytest.mark.parametrize("plugins", ["lsq", "adaround", "all"])
def test_rollback_to_before_learning(plugins):
    config = tiny_config("gdfq", train__epochs=3, **PLUGIN_SETS[plugins])
    trainer = tiny_trainer(config)
    game = trainer.game
    trainer.train_epoch()
    snapshot = trainer.snapshot()
    assert snapshot["qp_opt"] is None and snapshot["epoch"] == 1
    trainer.train_epoch()
    assert plugin(game, LearnedQuantizers).opt is not None and learned_keys(game.student)
    trainer.restore(snapshot)
    assert plugin(game, LearnedQuantizers).opt is None
    assert learned_keys(game.student) == []
    assert not any(hasattr(q, "step") for _, q in act_quantizers(game.student))
    state = game.student.state_dict()
    assert state.keys() == snapshot["student"].keys()
    for k, v in snapshot["student"].items():
        assert torch.equal(state[k], v), k
    # Redoing the epoch from the snapshot gives what a run without the detour gives.
    trainer.train_epoch()
    trainer.train_epoch()
    game.finish()
    straight = tiny_trainer(config)
    for _ in range(3):
        straight.train_epoch()
    straight.game.finish()
    assert_same_states(trainer, straight)


def test_rollback_to_a_checkpoint_taken_while_learning():
    trainer = tiny_trainer(tiny_config("gdfq", train__epochs=3, **PLUGIN_SETS["all"]))
    trainer.train_epoch()
    trainer.train_epoch()
    snapshot = trainer.snapshot()
    assert snapshot["qp_opt"] is not None
    student = clone_state(trainer.game.student)
    trainer.train_epoch()
    trainer.restore(snapshot)
    assert plugin(trainer.game, LearnedQuantizers).opt is not None
    state = trainer.game.student.state_dict()
    assert state.keys() == student.keys()
    for k, v in student.items():
        assert torch.equal(state[k], v), k


def test_teacher_is_untouched_by_the_plugins():
    teacher = tiny_classifier()
    before = clone_state(teacher)
    tiny_trainer(tiny_config("gdfq", train__epochs=3, **PLUGIN_SETS["all"]), teacher=teacher).run()
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


# ============================================================== review fixes
@pytest.mark.parametrize("name", ["plugins__lsq", "plugins__adaround"])
def test_deploy_evaluation_while_learning_is_the_final_model(name):
    """Under the deploy protocol the bias grids follow the learned steps, so what is evaluated during learning
    is exactly the model the run ends with."""
    trainer = tiny_trainer(tiny_config("gdfq", train__epochs=3, quant__protocol="deploy", **{name: True}))
    for _ in range(3):
        trainer.train_epoch()
    game = trainer.game
    x = game.fresh_batch().x
    with torch.no_grad(), game.evaluated() as q:
        evaluated = q(x)
    game.finish().eval()
    with torch.no_grad():
        assert_close(game.student(x), evaluated, rtol=0, atol=1e-5)


def test_rollback_lowers_the_learned_quantizer_learning_rates():
    trainer = _lsq_trainer()
    trainer.train_epoch()
    trainer.train_epoch()
    learned = plugin(trainer.game, LearnedQuantizers)
    base = [g["base_lr"] for g in learned.opt.param_groups]
    trainer.state.lr_scale = 0.25
    trainer.train_epoch()
    assert [g["lr"] for g in learned.opt.param_groups] == [0.25 * b for b in base]


def test_restore_does_not_alias_the_snapshot_optimizer_state():
    trainer = _lsq_trainer()
    trainer.train_epoch()
    trainer.train_epoch()
    snapshot = trainer.snapshot()
    frozen = {k: copy.deepcopy(snapshot[k]) for k in ("q_opt", "g_opt", "qp_opt")}
    trainer.restore(snapshot)
    trainer.game.iteration(True)
    for key, state in frozen.items():
        for pid, values in state["state"].items():
            for name, value in values.items():
                if torch.is_tensor(value):
                    assert torch.equal(snapshot[key]["state"][pid][name], value), (key, name)


def test_plugins_are_refused_where_they_would_be_ignored():
    with pytest.raises(DFQError, match="plugins"):  # recon has no plug-ins
        resolve_config(None, {"method.name": "recon", "method.plugins.lowpass": 0.5})
    with pytest.raises(DFQError, match="start learning at epoch"):
        tiny_game(tiny_config("gdfq", plugins__lsq=True, train__epochs=1))


def test_a_plugin_registered_from_outside_joins_q_s_step_after_the_builtin_ones(tmp_path):
    """PLUGINS is the one list the game builds its hooks from, in registration order."""
    from dfq.train.plugins import PLUGINS, Plugin

    class Probe(Plugin):
        def logged(self, out):
            return {"probe": torch.tensor(7.0)}

    assert list(PLUGINS) == ["lowpass", "hard_tau", "cam", "learned_quantizers"]
    PLUGINS.add("probe", lambda ctx: Probe())
    try:
        trainer = tiny_trainer("gdfq", run_dir=tmp_path)
        trainer.run()
        assert isinstance(trainer.game.plugins.items[-1], Probe)
        records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert all(r["q_probe"] == 7.0 for r in records) and len(records) == 2
    finally:
        del PLUGINS["probe"]
