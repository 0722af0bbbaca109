"""timm backbones (model.backbone=timm:<name>) with two tiny timm models, a CNN (test_resnet) and a ViT
(test_vit), on 1-channel 28 px images: widths by a dummy forward, the ViT's patch, local weights adapted
by timm or refused by key, the errors that name the problem, batched teachers, and the training stages
(cRT, LWS, tau-norm, a student over a CNN and a ViT teacher) with channels_last, bf16 autocast and compile."""
import sys

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm", reason="pip install 'fastcbd[timm]'")

from fastcbd.models import Student, Teacher, build_backbone
from fastcbd.models.cbd import backbone_kwargs
from fastcbd.train.ensemble import LoopTeachers, StackedTeachers

MNIST = {"image_size": [28, 28]}
VIT = {"image_size": [28, 28], "options": {"patch_size": 7}}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _forward(net, x):
    with torch.no_grad():
        return net.eval()(x)


def test_cnn_and_vit_widths_come_from_a_forward():
    x = torch.randn(3, 1, 28, 28)
    cnn = build_backbone("timm:test_resnet", 1, **MNIST)
    vit = build_backbone("timm:test_vit", 1, **VIT)
    for net in (cnn, vit):
        out = _forward(net, x)
        assert out.shape == (3, net.out_features), (type(net.net).__name__, out.shape, net.out_features)
    assert vit.net.patch_embed.img_size == (28, 28) and vit.net.patch_embed.patch_size == (7, 7)
    # MobileNetV3's pooled features pass a 1x1 conv head: num_features (288) is not its width (1024)
    mbv3 = build_backbone("timm:mobilenetv3_small_050", 1, **MNIST)
    assert mbv3.out_features == _forward(mbv3, x).shape[1] == 1024 != mbv3.net.num_features


def test_vit_patch_is_fitted_to_the_image_and_recorded():
    vit = build_backbone("timm:test_vit", 1, image_size=[28, 28])  # test_vit's patch 16 does not divide 28
    assert vit.net.patch_embed.patch_size == (14, 14) and vit.kwargs["patch_size"] == 14
    assert vit.kwargs["img_size"] == 28 and vit.kwargs["in_chans"] == 1


@pytest.mark.parametrize("backbone,kw,match", [
    ("timm:resnet5O", MNIST, "no model of that name; did you mean resnet50"),
    ("timm:test_convnext", MNIST, "cannot take 28x28 images .*networks that suit small images: resnet10t"),
    ("timm:test_resnet", {**MNIST, "options": {"pretrained": True}}, "never downloaded.*model.weights=FILE"),
    ("timm:hf-hub:timm/resnet18.a1_in1k", MNIST, "never downloads weights"),
    ("small_cnn", {"weights": "w.pt"}, "apply to timm:<name> backbones"),
])
def test_bad_backbones_are_named(backbone, kw, match):
    with pytest.raises(ValueError, match=match):
        build_backbone(backbone, 1, **kw)


def test_without_timm_the_error_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r"pip install 'fastcbd\[timm\]'"):
        build_backbone("timm:test_resnet", 1, **MNIST)


def test_weights_with_a_head_and_a_3_channel_stem_are_adapted(tmp_path):
    """A 3-channel, 10-class ImageNet-style file: timm drops the head and sums the stem over channels."""
    from safetensors.torch import save_file

    src = timm.create_model("test_resnet", num_classes=10, in_chans=3)
    sd = src.state_dict()
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": sd}, tmp_path / "w.pth")
    for path in (tmp_path / "w.safetensors", tmp_path / "w.pth"):
        net = build_backbone("timm:test_resnet", 1, weights=str(path), **MNIST)
        got = net.net.state_dict()
        torch.testing.assert_close(got["conv1.0.weight"], sd["conv1.0.weight"].sum(1, keepdim=True))
        for k, v in got.items():
            if k != "conv1.0.weight" and v.is_floating_point():
                assert torch.equal(v, sd[k]), f"{path.name}: {k} not loaded"


def test_vit_weights_are_resampled_to_the_patch_and_image(tmp_path):
    src = timm.create_model("test_vit", num_classes=5, in_chans=3)  # 160 px, patch 16
    torch.save(src.state_dict(), tmp_path / "vit.pt")
    net = build_backbone("timm:test_vit", 1, weights=str(tmp_path / "vit.pt"), **VIT)
    assert torch.equal(net.net.blocks[0].mlp.fc1.weight, src.blocks[0].mlp.fc1.weight)
    assert net.net.pos_embed.shape[1] == 1 + 16 and net.net.patch_embed.proj.weight.shape == (64, 1, 7, 7)


def test_weights_that_do_not_fit_are_refused_by_key(tmp_path):
    torch.save(timm.create_model("test_vit").state_dict(), tmp_path / "vit.pt")
    with pytest.raises(ValueError, match=r"does not fit timm:test_resnet: \d+ missing key\(s\) \[.*'conv1.0.weight'"):
        build_backbone("timm:test_resnet", 1, weights=str(tmp_path / "vit.pt"), **MNIST)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not a readable weights file"):
        build_backbone("timm:test_resnet", 1, weights=str(tmp_path / "junk.pt"), **MNIST)


@pytest.mark.parametrize("backbone,kw", [("timm:test_resnet", MNIST), ("timm:test_vit", VIT)])
def test_batched_teachers_match_the_loop(backbone, kw):
    torch.manual_seed(0)
    teachers = [Teacher(backbone, 4, 1, **kw).eval() for _ in range(2)]
    x = torch.randn(5, 1, 28, 28)
    for a, b in zip(LoopTeachers(teachers)(x), StackedTeachers(teachers)(x)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_student_projection_is_the_sum_of_the_teachers_widths_and_arch_rebuilds():
    cnn, vit = Teacher("timm:test_resnet", 4, 1, **MNIST), Teacher("timm:test_vit", 4, 1, **VIT)
    student = Student("timm:test_vit", 4, cnn.out_features + vit.out_features, 1, **VIT)
    assert student.projection[0].out_features == 96 + 64
    arch = {"backbone": "timm:test_vit", "image_size": [28, 28], "timm_kwargs": {"patch_size": 7}}
    again = Student("timm:test_vit", 4, 160, 1, **backbone_kwargs(arch))
    again.load_state_dict(student.state_dict())  # the same shapes: the arch record rebuilds the network


def _ctx28(tmp_path, **over):
    """A Context on 28 px gray images (class c: a bright bar at a class-specific height), 40/12/4 images.
    28 px, not 16: test_resnet's last stage then sees 2x2 maps (at 16 px, 1x1 maps gave NaN gradients
    in its first conv under CPU bf16 autocast within a few steps)."""
    from fastcbd.data.arrays import ArraySplits
    from fastcbd.train.config import load_config
    from fastcbd.train.stages import Context

    rng = np.random.default_rng(0)
    xs, ys = [], []
    for c, n in enumerate([40, 12, 4, 10, 10, 10]):
        img = rng.integers(0, 40, (n, 28, 28, 1)).astype(np.uint8)
        img[:, 4 + 8 * (c % 3):10 + 8 * (c % 3), 6:22] = 250
        xs.append(img)
        ys.append(np.full(n, c % 3))
    x, y = np.concatenate(xs), np.concatenate(ys)
    splits = ArraySplits("bars", x[:56], y[:56], x[56:], y[56:], 3)
    cfg = load_config(None, ["data.batch_size=16"] + [f"{k}={v}" for k, v in over.items()])
    return Context(cfg, splits, log_path=str(tmp_path / "m.jsonl"), progress=False)


def test_training_stages_with_timm_channels_last_bf16_and_compile(tmp_path):
    """A CNN teacher trained by the loop with channels_last, bf16 autocast and torch.compile (eager backend:
    dynamo traces the timm model); cRT, LWS and tau-norm on it; a ViT student distilled from it."""
    from fastcbd.train.baselines import run_baseline
    from fastcbd.train.stages import train_student, train_teacher

    ctx = _ctx28(tmp_path, **{"model.backbone": "timm:test_resnet", "teacher.optim.epochs": 2, "crt.epochs": 1,
                              "student.optim.epochs": 1, "amp": "bf16", "channels_last": "true", "compile": "eager"})
    teacher = train_teacher(ctx, "vanilla", 1)
    x = next(iter(ctx.test_loader()))[0]
    for name in ("crt", "lws", "tau_norm"):
        model = run_baseline(ctx, name, teacher, 2)
        assert _forward(model, x).shape == (len(x), 3), name
    ctx.cfg.model.backbone, ctx.cfg.model.timm_kwargs, ctx.cfg.compile = "timm:test_vit", {"depth": 1}, ""
    student = train_student(ctx, [teacher], 3)
    assert student.out_features == teacher.out_features == 96
    assert len(student.backbone.net.blocks) == 1 and student.backbone.net.patch_embed.img_size == (28, 28)


def test_batched_teachers_of_two_architectures_are_refused():
    from fastcbd.errors import ConfigError

    teachers = [Teacher("timm:test_resnet", 4, 1, **MNIST), Teacher("timm:test_vit", 4, 1, **VIT)]
    with pytest.raises(ConfigError, match="teacher.batched=on needs teachers of one architecture"):
        StackedTeachers(teachers)
