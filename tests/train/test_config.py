"""Config: defaults < YAML < dotted overrides; unknown keys and bad values are named."""
import pytest

from fastcbd.train.config import Config, load_config, to_dict


def test_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\nteacher:\n  optim:\n    epochs: 7\n    lr: 0.2\n")
    cfg = load_config(str(path), ["teacher.optim.lr=0.5", "aug.flip=false", "aug.crop_scale=[0.5,1.0]"])
    assert cfg.seed == 3 and cfg.teacher.optim.epochs == 7
    assert cfg.teacher.optim.lr == 0.5 and cfg.aug.flip is False and cfg.aug.crop_scale == (0.5, 1.0)
    assert cfg.student.optim.epochs == Config().student.optim.epochs
    assert to_dict(cfg)["aug"]["crop_scale"] == [0.5, 1.0]


@pytest.mark.parametrize("override,match", [
    (["teacher.optim.epoch=3"], r"unknown config key 'teacher.optim.epoch'"),
    (["nope=1"], r"unknown config key 'nope'"),
    (["seed=abc"], r"config key 'seed': expected a number"),
    (["aug.flip=maybe"], r"config key 'aug.flip': expected a boolean"),
    (["teacher=3"], r"config key 'teacher' is a section"),
    (["seed"], r"must look like key.sub=value"),
    (["student.sampler=uniform"], r"config key 'student.sampler': 'uniform' is not one of balanced, sqrt"),
    (["amp=fp8"], r"config key 'amp': 'fp8' is not one of none, bf16, fp16"),
])
def test_bad_overrides(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, override)


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("student:\n  alpha: [\n")
    with pytest.raises(ValueError, match="bad.yaml: invalid YAML"):
        load_config(str(path))
    path.write_text("student:\n  gamma: 1\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown config key 'student.gamma'"):
        load_config(str(path))


def test_shipped_demo_config_is_the_default():
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "mnist_lt", "demo.yaml")
    assert to_dict(load_config(path)) == to_dict(Config()), "configs/mnist_lt/demo.yaml drifted from the defaults"


def test_shipped_configs_load():
    import glob
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    paths = sorted(glob.glob(os.path.join(root, "*", "*.yaml")))
    assert {os.path.basename(os.path.dirname(p)) for p in paths} >= {"mnist_lt", "cifar10_lt", "cifar100_lt",
                                                                    "imagenet_lt", "inat18"}
    for p in paths:
        cfg = load_config(p)  # an unknown key raises, naming it
        assert cfg.teacher.optim.epochs > 0, p


def test_resolved_lr_is_written_and_the_file_still_loads(tmp_path):
    from fastcbd.train.config import save_config

    cfg = load_config(None, ["data.batch_size=64", "student.optim.accum=2", "student.optim.lr=0.1"])
    path = str(tmp_path / "config.yaml")
    save_config(cfg, path)
    text = open(path).read()
    assert "#   student: batch 128, lr 0.05" in text and "#   teacher: batch 64, lr 0.05" in text, text[-300:]
    assert to_dict(load_config(path)) == to_dict(cfg)
