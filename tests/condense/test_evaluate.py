"""fastcbd.condense.evaluate.train_classifiers: models trained at once in threads equal one after another."""
from __future__ import annotations

import pytest
import torch

from fastcbd.condense.dsa import DSA
from fastcbd.condense.evaluate import EvalConfig, train_classifiers
from fastcbd.condense.relabel import SoftLabeler


def _set(n=10):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 12, 12, generator=g), torch.arange(n) % 5


def _weights(nets):
    return [torch.cat([p.detach().flatten() for p in net.parameters()]) for net in nets]


@pytest.mark.parametrize("augment", [True, False])
@pytest.mark.parametrize("teacher", [False, True])
def test_threads_give_the_sequential_models_bit_for_bit(augment, teacher):
    x, y = _set()
    # batch 4 of 10 images: epochs of 4, 4, 2 (the draw sizes the generator is advanced by must follow them)
    base = {"repeats": 3, "steps": 7, "batch": 4, "width": 8, "depth": 2, "augment": augment}
    labeler = None
    if teacher:
        torch.manual_seed(1)
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 5))
        labeler = SoftLabeler(net.eval(), 2.0, (0.0,), (1.0,))
    runs = {}
    for workers in (1, 3):
        aug = DSA(seed=5)
        nets = train_classifiers(x, y, 5, EvalConfig(workers=workers, **base), [10, 11, 12], aug, teacher=labeler)
        runs[workers] = (_weights(nets), aug.generator.get_state())
    for k, (a, b) in enumerate(zip(runs[1][0], runs[3][0])):
        assert torch.equal(a, b), f"model {k}: threaded weights differ from sequential"
    assert torch.equal(runs[1][1], runs[3][1]), "the augmentation generator ends elsewhere than the sequential run's"
    assert not torch.equal(runs[1][0][0], runs[1][0][1])  # the models are different models


def test_eval_workers_must_be_positive(tmp_path, capsys):
    from fastcbd.cli import main

    rc = main(["condense", "--dataset", "mnist-lt", "--eval-workers", "0", "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: --eval-workers 0: must be at least 1" in err and "Traceback" not in err, err
