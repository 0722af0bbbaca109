"""Soft relabeling (fastcbd/condense/relabel.py): the loss against its formula, one-hot teachers reduce to
hard-label training, teachers that do not fit the dataset are refused, `--relabel auto` reuses its cache,
the ADSA-style calibration makes a balanced set's mean soft label uniform."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcbd.cli import main
from fastcbd.condense.evaluate import EvalConfig, train_classifier
from fastcbd.condense.relabel import LabelView, SoftLabeler, auto_teacher, load_labeler, relabel_loss
from fastcbd.errors import BadInputError
from fastcbd.models import Teacher
from fastcbd.train.checkpoint import save_model


def test_relabel_loss_is_the_tempered_kl():
    g = torch.Generator().manual_seed(0)
    s, z = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    for tau in (1.0, 2.5):
        p = (z / tau).softmax(1)
        q = (s / tau).softmax(1)
        want = tau ** 2 * (p * (p.log() - q.log())).sum(1).mean()
        got = relabel_loss(s, p, tau)
        assert torch.allclose(got, want, atol=1e-12), (tau, got.item(), want.item())


def test_one_hot_teacher_is_hard_label_cross_entropy():
    g = torch.Generator().manual_seed(1)
    s, y = torch.randn(9, 6, generator=g, dtype=torch.float64), torch.randint(6, (9,), generator=g)
    onehot = F.one_hot(y, 6).double()
    assert torch.allclose(relabel_loss(s, onehot, 1.0), F.cross_entropy(s, y), atol=1e-14)
    assert torch.allclose(relabel_loss(s, onehot, 3.0), 9.0 * F.cross_entropy(s / 3.0, y), atol=1e-12)


class LookupTeacher(nn.Module):
    """Knows each training image's label: logits 0 for it and -inf elsewhere (an exactly one-hot softmax)."""

    def __init__(self, x, y, k):
        super().__init__()
        self.x, self.y, self.k = x.flatten(1), y, k

    def forward(self, xb):
        match = (xb.flatten(1)[:, None, :] == self.x[None]).all(2)
        assert match.any(1).all(), "the lookup teacher saw an image it does not know"
        z = torch.full((len(xb), self.k), float("-inf"))
        z[torch.arange(len(xb)), self.y[match.float().argmax(1)]] = 0.0
        return z


def test_relabeled_training_with_a_one_hot_teacher_equals_hard_label_training():
    """Same seed, same batches: a one-hot teacher's soft labels give the hard-label network (to rounding)."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(13, 1, 8, 8, generator=g), torch.arange(13) % 3
    cfg = EvalConfig(repeats=1, steps=6, batch=5, width=4, depth=2, augment=False)
    hard = train_classifier(x, y, 3, cfg, seed=7, aug=None)
    labeler = SoftLabeler(LookupTeacher(x, y, 3), 1.0, [0.0], [1.0])
    soft = train_classifier(x, y.flip(0), 3, cfg, seed=7, aug=None, teacher=labeler)  # stored labels ignored
    worst = max((a - b).abs().max().item() for a, b in zip(hard.parameters(), soft.parameters()))
    assert worst < 1e-6, f"largest parameter difference {worst}"
    # and the stored (here wrong) labels would have given another network
    other = train_classifier(x, y.flip(0), 3, cfg, seed=7, aug=None)
    assert max((a - b).abs().max().item() for a, b in zip(hard.parameters(), other.parameters())) > 1e-3


def test_labeler_maps_the_run_normalisation_to_the_teachers():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return torch.zeros(len(x), 2)

    lab = SoftLabeler(Probe(), 2.0, run_mean=[0.5], run_std=[0.25], teacher_mean=[0.1], teacher_std=[0.5])
    raw = torch.rand(3, 1, 4, 4, dtype=torch.float64).float()
    lab.probs((raw - 0.5) / 0.25)
    assert torch.allclose(seen[0], (raw - 0.1) / 0.5, atol=1e-6), (seen[0] - (raw - 0.1) / 0.5).abs().max()


def test_label_views_sum_groups_and_renormalise_members():
    z = torch.tensor([[1.0, 2.0, 0.5, -1.0]])

    class Fixed(nn.Module):
        def forward(self, x):
            return z.expand(len(x), -1)

    lab = SoftLabeler(Fixed(), 1.0, [0.0], [1.0])
    p = z.softmax(1)[0]
    g = LabelView(lab, groups=[[0, 2], [1, 3]]).probs(torch.zeros(1, 1, 2, 2))[0]
    assert torch.allclose(g, torch.stack([p[0] + p[2], p[1] + p[3]]))
    m = LabelView(lab, members=[1, 3]).probs(torch.zeros(1, 1, 2, 2))[0]
    assert torch.allclose(m, torch.stack([p[1], p[3]]) / (p[1] + p[3]))


def test_calibration_makes_the_mean_soft_label_of_a_balanced_set_uniform():
    """A teacher biased towards class 0 by +2 on every image: after calibration the set's mean is uniform."""
    torch.manual_seed(0)
    head = nn.Linear(16, 4)
    with torch.no_grad():
        head.bias += torch.tensor([2.0, 0.0, 0.0, -1.0])
    net = nn.Sequential(nn.Flatten(), head)
    lab = SoftLabeler(net, 1.0, [0.0], [1.0])
    x = torch.randn(40, 1, 4, 4)
    before = lab.probs(x).mean(0)
    bias = lab.calibrate(x, aug=None, views=1, rounds=5)
    after = lab.probs(x).mean(0)
    assert (before - 0.25).abs().max() > 0.1, before
    assert (after - 0.25).abs().max() < 0.01, after
    assert bias[0] > bias[1] and bias[3] < bias[2], bias
    assert (lab.predict(x) == net(x).argmax(1).numpy()).all()  # the teacher's own accuracy is uncalibrated


def _model_file(path, num_classes=10, size=(28, 28), channels=1):
    model = Teacher("small_cnn", num_classes, in_channels=channels, width=4)
    arch = {"role": "teacher", "backbone": "small_cnn", "num_classes": num_classes, "in_channels": channels,
            "sigma": 20.0, "width": 4}
    info = {"input": {"channels": channels, "size": list(size), "mean": [0.1] * channels, "std": [0.3] * channels,
                      "resize": None}, "class_names": None}
    save_model(str(path), model, arch, {}, info)
    return str(path)


def test_a_teacher_that_does_not_fit_is_refused(tmp_path):
    good = _model_file(tmp_path / "good.pt")
    lab = load_labeler(good, 10, (1, 28, 28), [0.1], [0.3], 1.0)
    assert lab.probs(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(BadInputError, match=r"--relabel .*five.pt: the teacher has 5 classes, the dataset 10"):
        load_labeler(_model_file(tmp_path / "five.pt", num_classes=5), 10, (1, 28, 28), [0.1], [0.3], 1.0)
    with pytest.raises(BadInputError, match=r"the teacher takes 1 x 32x32 images, the dataset has 1 x 28x28"):
        load_labeler(_model_file(tmp_path / "big.pt", size=(32, 32)), 10, (1, 28, 28), [0.1], [0.3], 1.0)
    with pytest.raises(BadInputError, match=r"the teacher takes 3 x 28x28 images, the dataset has 1 x 28x28"):
        load_labeler(_model_file(tmp_path / "rgb.pt", channels=3), 10, (1, 28, 28), [0.1], [0.3], 1.0)
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(BadInputError, match="junk.pt"):
        load_labeler(str(tmp_path / "junk.pt"), 10, (1, 28, 28), [0.1], [0.3], 1.0)


def test_cli_refuses_a_wrong_teacher_with_one_line(tmp_path, capsys):
    five = _model_file(tmp_path / "five.pt", num_classes=5)
    code = main(["condense", "--relabel", five, "--out", str(tmp_path / "o"), "--preset", "cpu", "--threads", "1",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "error: --relabel" in err and "5 classes, the dataset 10" in err and "Traceback" not in err, err


def test_relabel_auto_reuses_its_cached_teacher(tmp_path, monkeypatch):
    from fastcbd.condense import relabel

    settings = relabel.auto_settings("mnist-lt", 100.0, 0, None, 2, 4, {"flip": False})
    calls = []
    real = relabel.train_auto_teacher

    def counted(*args, **kw):
        calls.append(args[3]["width"])
        return real(*args, **kw)

    monkeypatch.setattr(relabel, "train_auto_teacher", counted)
    g = torch.Generator().manual_seed(0)
    x, y, counts = torch.randn(30, 1, 28, 28, generator=g), torch.arange(30) % 10, [3] * 10
    path, reused = auto_teacher(settings, str(tmp_path / "teachers"), x, y, counts, [0.1], [0.3])
    assert (reused, calls) == (False, [4]) and os.path.exists(path)
    stamp = os.stat(path).st_mtime_ns
    again, reused = auto_teacher(dict(settings), str(tmp_path / "teachers"), x, y, counts, [0.1], [0.3])
    assert (again, reused, calls) == (path, True, [4]), "the cached teacher was trained again"
    assert os.stat(path).st_mtime_ns == stamp
    other, reused = auto_teacher({**settings, "width": 5}, str(tmp_path / "teachers"), x, y, counts, [0.1], [0.3])
    assert other != path and not reused and calls == [4, 5]  # other settings: another teacher
    lab = load_labeler(path, 10, (1, 28, 28), [0.1], [0.3], 1.0)  # the cached file is a fastcbd model file
    net = real(x, y, counts, settings, 56)  # the file holds the network train_auto_teacher returns
    with torch.no_grad():
        torch.testing.assert_close(lab.logits(x[:4]), net(x[:4]).float())


def test_condense_cifar100_lt_rldd_relabeled_by_a_model_file(tmp_path):
    """CIFAR-100-LT (generated pickle batches), --method rldd, --relabel with a fastcbd model file: the
    results carry hard-label and relabeled columns, the teacher's accuracy and each stage's time."""
    import json
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "data"))
    from data_files import write_cifar

    folder = write_cifar(str(tmp_path), num_classes=100, per_class_train=20, per_class_test=1)
    teacher = _model_file(tmp_path / "t100.pt", num_classes=100, size=(32, 32), channels=3)
    from fastcbd.condense.presets import apply_preset
    from fastcbd.condense.run import CondenseConfig, run_condense

    out = tmp_path / "out"
    cfg = CondenseConfig(methods=("rldd",), dataset="cifar100-lt", data_root=folder, rho=10, ipc=2, relabel=teacher,
                         relabel_tau=2.0, baselines=False, threads=1, preset="cpu")
    apply_preset(cfg, "cpu")
    for section in (cfg.rldd, cfg.eval):
        section.width = 4
    cfg.rldd.observer_steps, cfg.rldd.iterations, cfg.eval.repeats, cfg.eval.steps = 3, 2, 1, 2
    run_condense(cfg, str(out), progress=False)
    r = json.loads((out / "results.json").read_text())
    m = r["methods"]["rldd"]
    assert len(m["per_class"]) == 100 and sum(r["budget"]) == m["images"] == 200
    assert set(m["relabel"]) >= {"all", "many", "medium", "few", "std"} and "calibrated" not in m
    assert r["teacher"]["path"] == teacher and r["teacher"]["tau"] == 2.0 and r["teacher"]["reused"] is None
    assert 0 <= r["teacher"]["accuracy"]["all"] <= 100
    assert {"teacher, once per run", "rldd: observer", "rldd: init", "rldd: recovery", "rldd: distillation",
            "rldd: evaluation (hard labels)", "rldd: evaluation@relabel"} <= set(r["stage_times_s"])
    md = (out / "results.md").read_text()
    assert "| teacher |" in md and "relabeled: all" in md and "Seconds per seed by stage" in md
