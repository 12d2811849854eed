"""Every speed-up that claims exactness gives the same numbers as the straightforward loop."""

from __future__ import annotations

import pytest
import torch

from dfq.config import resolve_config
from dfq.engine import Engine
from dfq.models import create_model
from dfq.quant import calibrate


def _engine(method: str, shared: bool) -> Engine:
    torch.manual_seed(0)
    config = resolve_config(None, {"method": method, "seed": 3, "train.batch_size": 6})
    e = Engine(config, create_model("resnet20a_cifar10"), num_classes=10, input_size=(3, 32, 32), progress=False)
    calibrate(e.student, [torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))])
    e.share_student_forward = shared
    return e


@pytest.mark.parametrize("method", ["adadfq", "adasg"])
def test_shared_student_forward_equals_two_forwards(method):
    fast, slow = _engine(method, True), _engine(method, False)
    assert fast._can_share_student_forward(True) and not slow._can_share_student_forward(True)
    for _ in range(3):
        logs_fast, logs_slow = fast._iteration(True), slow._iteration(True)
        assert logs_fast.keys() == logs_slow.keys()
        for k in logs_fast:
            assert torch.equal(logs_fast[k], logs_slow[k]), k
    for name, a, b in (("Q", fast.student, slow.student), ("G", fast.generator, slow.generator)):
        for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(va, vb), f"{name} {k}"
    for k, v in slow.q_opt.state_dict()["state"].items():
        assert torch.equal(fast.q_opt.state_dict()["state"][k]["momentum_buffer"], v["momentum_buffer"])


def test_not_shared_while_observing_ranges():
    e = _engine("adadfq", True)
    from dfq.quant import set_act_mode

    set_act_mode(e.student, "observe")
    assert not e._can_share_student_forward(True)
    assert not e._can_share_student_forward(False)  # warm-up: no Q step at all
