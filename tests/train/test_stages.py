"""The training stages on a tiny synthetic long-tailed set: frozen, eval-mode teachers; cRT freezes
the backbone; the student learns."""
import numpy as np
import pytest
import torch

from fastcbd.data.arrays import ArraySplits
from fastcbd.models import Teacher
from fastcbd.train.config import load_config
from fastcbd.train.stages import Context, train_crt, train_student, train_teacher


def tiny_splits(seed=0):
    """Class c is a bright square at a class-specific place; counts 40, 12, 4."""
    rng = np.random.default_rng(seed)
    counts, xs, ys = [40, 12, 4], [], []
    for c, n in enumerate(counts + [10, 10, 10]):
        img = rng.integers(0, 40, (n, 16, 16, 1)).astype(np.uint8)
        img[:, 2 + 4 * (c % 3) : 6 + 4 * (c % 3), 4:12] = 250
        xs.append(img)
        ys.append(np.full(n, c % 3))
    x, y = np.concatenate(xs), np.concatenate(ys)
    train = np.arange(sum(counts))
    test = np.arange(sum(counts), len(y))
    return ArraySplits("tiny", x[train], y[train], x[test], y[test], 3)


def tiny_ctx(tmp_path, **over):
    overrides = ["teacher.optim.epochs=3", "student.optim.epochs=3", "crt.epochs=2", "data.batch_size=16",
                 "model.width=8"] + [f"{k}={v}" for k, v in over.items()]
    return Context(load_config(None, overrides), tiny_splits(), log_path=str(tmp_path / "m.jsonl"), progress=False)


def _bn_buffers(model):
    return {n: b.clone() for n, b in model.named_buffers()}


def test_teachers_stay_frozen_and_in_eval_mode(tmp_path):
    ctx = tiny_ctx(tmp_path)
    teachers = [train_teacher(ctx, "vanilla", 1), train_teacher(ctx, "aug", 2)]
    for t in teachers:  # a teacher handed over in train mode must still not drift
        t.train()
    before = [_bn_buffers(t) for t in teachers]
    weights = [{n: p.clone() for n, p in t.named_parameters()} for t in teachers]
    student = train_student(ctx, teachers, 3)
    for k, t in enumerate(teachers):
        assert not t.training, f"teacher {k} was left in train mode"
        for n, b in t.named_buffers():
            assert torch.equal(b, before[k][n]), f"teacher {k} buffer {n} changed during student training"
        for n, p in t.named_parameters():
            assert torch.equal(p, weights[k][n]), f"teacher {k} parameter {n} changed"
    assert student.out_features == sum(t.out_features for t in teachers)


def test_crt_trains_only_the_classifier(tmp_path):
    ctx = tiny_ctx(tmp_path)
    teacher = train_teacher(ctx, "vanilla", 1)
    crt = train_crt(ctx, teacher, 4)
    for (n, a), (_, b) in zip(teacher.backbone.state_dict().items(), crt.backbone.state_dict().items()):
        assert torch.equal(a, b), f"cRT changed the backbone's {n}"
    assert not torch.equal(teacher.classifier.weight, crt.classifier.weight)


def test_student_learns_the_task(tmp_path):
    ctx = tiny_ctx(tmp_path, **{"teacher.optim.epochs": 15, "student.optim.epochs": 15})
    teacher = train_teacher(ctx, "vanilla", 1)
    student = train_student(ctx, [teacher], 2)
    from fastcbd.train.metrics import evaluate

    acc = evaluate(student, ctx.test_loader(), ctx.splits.class_counts)
    assert acc["all"] > 60.0, f"the student learned nothing on an easy task: {acc}"
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert any('"stage": "cbd"' in line for line in lines), "the student's epochs were not logged"


def test_student_same_with_cpu_kernels_and_torch(tmp_path, monkeypatch):
    """The fused C++ backend and the plain-torch backend train the same student (to float noise)."""
    import json

    from fastcbd import _ext
    from fastcbd.train.metrics import evaluate

    if not _ext.available():
        import pytest

        pytest.skip(f"fastcbd._C is not built: {_ext.IMPORT_ERROR!r}")
    ctx = tiny_ctx(tmp_path, **{"teacher.optim.epochs": 8, "student.optim.epochs": 8})
    teachers = [train_teacher(ctx, "vanilla", 1), train_teacher(ctx, "aug", 2)]
    results = {}
    for name in ("cpu", "torch"):
        monkeypatch.setenv("FASTCBD_BACKEND", name)
        ctx.log_path = str(tmp_path / f"{name}.jsonl")
        student = train_student(ctx, teachers, 3, desc=name)
        losses = [json.loads(line)["loss"] for line in open(ctx.log_path)]
        results[name] = (evaluate(student, ctx.test_loader(), ctx.splits.class_counts), losses)
    (acc_cpu, loss_cpu), (acc_torch, loss_torch) = results["cpu"], results["torch"]
    for e, (a, b) in enumerate(zip(loss_cpu, loss_torch)):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(b)), f"epoch {e}: loss {a} (cpu) vs {b} (torch)"
    assert abs(acc_cpu["all"] - acc_torch["all"]) <= 5.0, f"accuracy cpu {acc_cpu['all']} vs torch {acc_torch['all']}"


@pytest.mark.parametrize("name,cls", [("balanced", "ClassBalancedSampler"), ("progressive", "ProgressiveSampler"),
                                      ("sqrt", "SqrtSampler")])
def test_student_sampler_is_configurable(tmp_path, name, cls):
    ctx = tiny_ctx(tmp_path, **{"student.sampler": name, "student.optim.epochs": 2})
    made = []
    build = ctx.train_loader

    def spy(*args, **kw):
        loader, smp = build(*args, **kw)
        made.append(smp)
        return loader, smp

    ctx.train_loader = spy
    teacher = Teacher("small_cnn", 3, 1, 20.0, 8)
    train_student(ctx, [teacher], 2)
    assert [type(s).__name__ for s in made] == [cls]
    if name == "progressive":
        assert made[0].epochs == 2 and made[0].epoch == 1  # moves from instance towards balanced over the run


def test_student_step_compiled_by_inductor_matches_eager(tmp_path):
    """compile=inductor (C++ code generated and built on this CPU) trains the CBD student, fused loss
    included, to the eager weights within float noise."""
    over = {"student.optim.epochs": 1, "amp": "none", "channels_last": "false"}
    teacher = Teacher("small_cnn", 3, 1, 20.0, 8)
    eager = train_student(tiny_ctx(tmp_path, **over), [teacher], 2).state_dict()
    compiled = train_student(tiny_ctx(tmp_path, **over, compile="inductor"), [teacher], 2).state_dict()
    for name, v in eager.items():
        torch.testing.assert_close(compiled[name], v, rtol=1e-3, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
