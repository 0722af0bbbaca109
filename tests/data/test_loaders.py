"""build_loader / `loader: auto|dali|device|torch`, and file datasets through the trainer's Context."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from data_files import write_cifar
from loader_testing import run_epoch, small_splits

from fastcbd.data import build_loader, mnist_lt, resolve_loader
from fastcbd.data.augment import AugmentConfig, random_pad_crop
from fastcbd.data.device_loader import DeviceLoader
from fastcbd.data.samplers import ClassBalancedSampler
from fastcbd.data.torch_loader import TorchLoader
from fastcbd.train.config import load_config
from fastcbd.train.pipeline import load_data

CPU = torch.device("cpu")


def test_auto_chooses_by_data_and_machine(tmp_path):
    arrays = mnist_lt()
    files = small_splits(tmp_path)
    assert resolve_loader("auto", arrays, CPU) == "device"
    assert resolve_loader("auto", files, CPU) == "torch"  # no GPU: DataLoader + decode_jpeg beats DALI on CPU
    assert resolve_loader("torch", arrays, CPU) == "torch"
    with pytest.raises(ValueError, match="loader=device needs in-memory arrays"):
        resolve_loader("device", files, CPU)
    with pytest.raises(ValueError, match="loader=dali reads image files"):
        resolve_loader("dali", arrays, CPU)
    with pytest.raises(ValueError, match="expected one of auto, dali, device, torch"):
        resolve_loader("ffcv", arrays, CPU)


def test_torch_loader_on_arrays_matches_the_device_loader_order():
    d = mnist_lt()
    kw = dict(batch_size=64, aug=AugmentConfig(), mean=[0.1], std=[0.3], device="cpu", workers=0)
    out = {}
    for kind in ("device", "torch"):
        smp = ClassBalancedSampler(d.y_train, seed=1)
        loader = build_loader(d, True, sampler=smp, loader=kind, **kw)
        assert isinstance(loader, DeviceLoader if kind == "device" else TorchLoader)
        out[kind], shapes = run_epoch(loader, smp)
        assert shapes[0] == (64, 1, 28, 28)
    assert np.array_equal(out["device"], out["torch"])


def test_import_fastcbd_never_imports_dali():
    code = "import fastcbd, fastcbd.data, fastcbd.train.stages, sys; print('nvidia.dali' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_random_pad_crop_is_a_shifted_window():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).view(2, 3, 5, 6) + 1
    y = random_pad_crop(x, 2, True, g)
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):
        windows = [w for oy in range(5) for ox in range(5) for w in (xp[b, :, oy:oy + 5, ox:ox + 6],
                                                                     xp[b, :, oy:oy + 5, ox:ox + 6].flip(-1))]
        assert any(torch.equal(y[b], w) for w in windows), f"image {b} is not a padded crop of its input"


def test_load_data_formats(tmp_path):
    write_cifar(tmp_path, 10, per_class_train=50, per_class_test=3)
    cfg = load_config(None, ["data.dataset=cifar10-lt", f"data.root={tmp_path}", "data.rho=10"])
    d = load_data(cfg)
    assert d.class_counts[0] == 50 and d.class_counts[-1] == 5 and len(d.y_test) == 30
    with pytest.raises(ValueError, match="needs data.root"):
        load_data(load_config(None, ["data.dataset=cifar100-lt"]))
    with pytest.raises(ValueError, match="expected one of mnist-lt, npz, cifar10-lt"):
        load_data(load_config(None, ["data.dataset=coco"]))
    val = load_data(load_config(None, ["data.dataset=cifar10-lt", f"data.root={tmp_path}", "data.rho=10", "data.split=val"]))
    assert val.class_counts[0] == 45 and len(val.y_test) == 50  # a tenth of each class's 50 held out
    with pytest.raises(ValueError, match="for imagenet-lt, point data.test_list at the dataset's validation list"):
        load_data(load_config(None, ["data.dataset=imagenet-lt", "data.split=val"]))


def test_context_trains_and_evaluates_on_image_files(tmp_path):
    from fastcbd.train.metrics import evaluate
    from fastcbd.train.stages import Context, train_teacher

    small_splits(tmp_path / "d")
    cfg = load_config(None, [
        "data.dataset=imagenet-lt", f"data.root={tmp_path / 'd'}", "data.train_list=train.txt",
        "data.test_list=test.txt", "data.image_size=32", "data.batch_size=8", "data.workers=0",
        "teacher.optim.epochs=1", "amp=none", "channels_last=false", "model.width=4",
    ])
    ctx = Context(cfg, load_data(cfg), progress=False)
    assert ctx.in_channels == 3 and ctx.mean == [0.485, 0.456, 0.406]
    loader, smp = ctx.train_loader("balanced", "aug", seed=1)
    assert isinstance(loader, TorchLoader) and smp.num_classes == 4
    model = train_teacher(ctx, "vanilla", seed=1)
    metrics = evaluate(model, ctx.test_loader(), ctx.splits.class_counts)
    assert set(metrics) >= {"all", "many", "medium", "few"} and 0 <= metrics["all"] <= 100
    assert abs(metrics["all"] - sum(metrics["per_class"]) / 4) < 1e-6, metrics  # balanced test: mean of classes
