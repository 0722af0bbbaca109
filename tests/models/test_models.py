"""Backbones, teacher and student shapes; the student's projection size."""
import pytest
import torch

from fastcbd.models import Student, Teacher, build_backbone


@pytest.mark.parametrize("name,shape,dim", [("small_cnn", (2, 1, 28, 28), 128), ("resnet32", (2, 3, 32, 32), 64),
                                            ("resnet18", (2, 3, 64, 64), 512), ("resnet50", (1, 3, 64, 64), 2048)])
def test_backbone_feature_dims(name, shape, dim):
    net = build_backbone(name, shape[1]).eval()
    with torch.no_grad():
        out = net(torch.randn(shape))
    assert out.shape == (shape[0], dim) and net.out_features == dim


def test_convnet3_is_the_condense_convnet_without_its_classifier():
    from fastcbd.condense.convnet import ConvNet
    from fastcbd.errors import ConfigError

    net = build_backbone("convnet3", 1, width=8, image_size=[28, 28]).eval()
    ref = ConvNet(1, 10, (28, 28), width=8).eval()
    ref.features.load_state_dict(net.features.state_dict())
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(net(x), ref.embed(x)) and net.out_features == 8 * 3 * 3 == ref.feat_dim
    with pytest.raises(ConfigError, match="convnet3 needs the image size"):
        build_backbone("convnet3", 1)


def test_resnet32_depth():
    net = build_backbone("resnet32", 3)
    convs = sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in net.modules())
    assert convs == 31, f"ResNet-32 has 31 3x3 convs + the classifier, got {convs}"


def test_unknown_backbone_is_named():
    with pytest.raises(ValueError, match="model.backbone='vgg'"):
        build_backbone("vgg")


def test_teacher_and_student():
    t = Teacher("small_cnn", 10, in_channels=1)
    s = Student("small_cnn", 10, proj_dim=3 * t.out_features, in_channels=1)
    x = torch.randn(4, 1, 28, 28)
    assert t(x).shape == (4, 10) and t.features(x).shape == (4, 128)
    p = s.features(x)
    assert p.shape == (4, 384) and (p >= 0).all(), "the student projection ends with a ReLU"
    assert s(x).shape == (4, 10)
    assert s.classifier.weight.shape == (10, 384)
