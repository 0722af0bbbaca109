"""The torch DataLoader fallback: decode_jpeg, crops, the samplers' order, resume, bad images."""
import numpy as np
import pytest
import torch
from data_files import chi2_critical, chi2_stat
from loader_testing import check_train_epoch, run_epoch, small_splits

from fastcbd.data import BadInputError, build_loader
from fastcbd.data.augment import AugmentConfig
from fastcbd.data.decode import check_bytes, decode_rgb
from fastcbd.data.samplers import ClassBalancedSampler, InstanceSampler

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def loader_for(splits, sampler=None, train=True, workers=0, batch_size=8, aug=None, **kw):
    return build_loader(splits, train, batch_size=batch_size, sampler=sampler, aug=aug or AugmentConfig(),
                        mean=MEAN, std=STD, device="cpu", loader="torch", workers=workers, **kw)


def test_train_batches_follow_the_sampler(tmp_path):
    s = small_splits(tmp_path)
    smp = InstanceSampler(s.y_train, seed=2)
    loader = loader_for(s, smp)
    check_train_epoch(loader, smp, s.y_train, MEAN, STD, 4)


def test_eval_is_sequential_centre_crop(tmp_path):
    s = small_splits(tmp_path)
    loader = loader_for(s, train=False, batch_size=3)
    labels, shapes = run_epoch(loader)
    assert np.array_equal(labels, s.y_test) and shapes[0] == (3, 3, 32, 32)


def test_workers_give_the_same_order_and_balanced_draw(tmp_path):
    s = small_splits(tmp_path)
    smp = [ClassBalancedSampler(s.y_train, num_samples=400, seed=0) for _ in range(2)]
    a, _ = run_epoch(loader_for(s, smp[0], workers=0, batch_size=50), smp[0])
    b, _ = run_epoch(loader_for(s, smp[1], workers=2, batch_size=50), smp[1])
    assert np.array_equal(a, b)
    stat = chi2_stat(np.bincount(a, minlength=4), np.full(4, 0.25))
    assert stat < chi2_critical(3), f"chi2 {stat:.1f}"


def test_resume_mid_epoch(tmp_path):
    s = small_splits(tmp_path)
    full_smp = ClassBalancedSampler(s.y_train, seed=9)
    full, _ = run_epoch(loader_for(s, full_smp, batch_size=4), full_smp, epoch=2)
    smp = ClassBalancedSampler(s.y_train, seed=9)
    head, _ = run_epoch(loader_for(s, smp, batch_size=4), smp, epoch=2, stop_after=3)
    state = smp.state_dict()
    assert state["consumed"] == 12
    resumed = ClassBalancedSampler(s.y_train, seed=0)
    resumed.load_state_dict(state)
    tail, _ = run_epoch(loader_for(s, resumed, batch_size=4))  # no set_epoch: continue where it stopped
    assert np.array_equal(np.concatenate([head, tail]), full)


def test_aug_teacher_photometric_runs_batched(tmp_path):
    s = small_splits(tmp_path)
    aug = AugmentConfig(crop_scale=(0.3, 1.0), color_jitter=1.0, grayscale_p=0.5)
    x, _ = next(iter(loader_for(s, InstanceSampler(s.y_train), aug=aug)))
    assert x.shape == (8, 3, 32, 32) and torch.isfinite(x).all()


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def test_bad_jpeg_names_the_file(tmp_path):
    s = small_splits(tmp_path)
    bad = s.train.paths[3]
    _truncate(bad)
    smp = InstanceSampler(s.y_train)
    for workers in (0, 1):
        with pytest.raises(Exception, match=f"{bad}: truncated JPEG"):
            run_epoch(loader_for(s, smp, workers=workers), smp, epoch=workers)


def test_skip_bad_replaces_and_logs(tmp_path, caplog):
    s = small_splits(tmp_path)
    bad = s.train.paths[0]
    _truncate(bad)
    smp = InstanceSampler(s.y_train, seed=1)
    loader = loader_for(s, smp, skip_bad=True)
    labels, shapes = run_epoch(loader, smp)
    assert len(labels) == len(s.y_train) and np.array_equal(labels, s.y_train[smp.draw()])
    assert len(loader.skipped) == 1 and bad in loader.skipped[0] and bad in caplog.text
    test_bad = s.test.paths[1]
    _truncate(test_bad)
    ev = loader_for(s, train=False, batch_size=3, skip_bad=True)
    labels, _ = run_epoch(ev)
    assert len(labels) == len(s.y_test) - 1 and len(ev.skipped) == 1


def test_decode_checks():
    with pytest.raises(BadInputError, match="x.jpg: empty image file"):
        check_bytes(b"", "x.jpg")
    with pytest.raises(BadInputError, match="y.jpg: cannot decode image"):
        decode_rgb(b"\xff\xd8" + b"\x00" * 50 + b"\xff\xda\xff\xd9", "y.jpg")
    with pytest.raises(BadInputError, match="z.png: cannot decode image"):
        decode_rgb(b"\x89PNG not really", "z.png")


def test_png_and_gray_decode(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((5, 7), 77, np.uint8)).save(tmp_path / "g.png")
    x = decode_rgb(open(tmp_path / "g.png", "rb").read(), "g.png")
    assert x.shape == (3, 5, 7) and x.dtype == torch.uint8 and (x == 77).all()



@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_normalize_in_place_matches_the_formula(layout):
    from fastcbd.data.augment import normalize_

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 3, 5, 7), generator=g).double()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randint(0, 256, (3, 3, 5, 14), generator=g).double()[..., ::2]
    mean, std = torch.tensor([120.0, 30.5, 200.0], dtype=torch.float64), torch.tensor([50.0, 7.0, 0.5], dtype=torch.float64)
    expected = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    out = normalize_(x, mean, std)
    assert out is x and out.stride() == x.stride()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_channels_last_batches_hold_the_same_images(tmp_path):
    s = small_splits(tmp_path)
    plain = next(iter(loader_for(s, train=False, batch_size=5)))[0]
    cl = next(iter(loader_for(s, train=False, batch_size=5, channels_last=True)))[0]
    assert cl.is_contiguous(memory_format=torch.channels_last) and not plain.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(plain, cl)


def test_crop_box_is_the_nvjpeg_loaders_vectorised_draw():
    """The workers' per-image crop_box and the nvjpeg loader's crop_boxes (both torchvision's get_params
    rule) agree on the same generator, including images where no try fits (centre fallback)."""
    from fastcbd.data.nvjpeg import crop_boxes
    from fastcbd.data.torch_loader import crop_box

    sizes = [(40, 48), (10, 300), (300, 12), (224, 224), (1, 1), (3, 500)]
    for aug in (AugmentConfig(), AugmentConfig(crop_scale=(0.9, 1.0)), AugmentConfig(crop_scale=(0.08, 1.0), flip=False)):
        for seed in range(40):
            for h, w in sizes:
                got = crop_box(h, w, aug, torch.Generator().manual_seed(seed))
                want = crop_boxes(torch.tensor([[h, w]]), aug, torch.Generator().manual_seed(seed))[0].tolist()
                assert [*got[:4], int(got[4])] == want, f"{aug} seed {seed} image {h}x{w}: {got} != {want}"


def test_resume_mid_epoch_with_workers_gives_the_same_images(tmp_path):
    """Crops are drawn in the workers from each sample's (seed, epoch, position): a loader resumed from a
    mid-epoch state (sampler + loader) yields the unbroken run's batches bit for bit, with 2 workers as
    with none, a repeated image gets another crop at another position, and the global RNG is untouched."""
    s = small_splits(tmp_path)
    aug = AugmentConfig(crop_scale=(0.2, 1.0), color_jitter=1.0, grayscale_p=0.3)

    def fresh(workers=2, seed=4):
        smp = ClassBalancedSampler(s.y_train, seed=seed)  # with replacement: images repeat within the epoch
        smp.set_epoch(1)
        return smp, loader_for(s, smp, workers=workers, batch_size=5, aug=aug, seed=11)

    rng = torch.get_rng_state()
    smp, loader = fresh()
    full = list(loader)
    assert torch.equal(torch.get_rng_state(), rng), "the loader drew from the global torch RNG"
    order = smp.draw()
    xs = torch.cat([x for x, _ in full])
    p, q = next((p, q) for p in range(len(order)) for q in range(p + 1, len(order)) if order[p] == order[q])
    assert not torch.equal(xs[p], xs[q]), f"image {order[p]} at positions {p} and {q} got the same crop"

    smp, loader = fresh()
    it = iter(loader)
    head = [next(it) for _ in range(3)]
    states = smp.state_dict(), loader.state_dict()
    del it
    assert states[0]["consumed"] == 15
    smp, loader = fresh(seed=0)
    smp.load_state_dict(states[0])
    loader.load_state_dict(states[1])
    tail = list(loader)  # no set_epoch: continue where it stopped
    _, serial = fresh(workers=0)
    for name, got in (("resumed", head + tail), ("0 workers", list(serial))):
        assert len(got) == len(full) == 5, (name, len(got))
        for k, ((x, y), (x2, y2)) in enumerate(zip(full, got)):
            bad = (x != x2).sum().item()
            assert torch.equal(y, y2) and bad == 0, f"{name}: batch {k} differs ({bad} values)"


def test_workers_leave_ctrl_c_and_sigterm_to_the_trainer(tmp_path):
    """Ctrl-C reaches the whole process group: the workers ignore SIGINT and SIGTERM (the trainer
    checkpoints and stops after its step), where a worker killed by them would starve the trainer."""
    import signal

    from fastcbd.data.torch_loader import FileImages, TorchLoader

    class Dispositions(FileImages):
        def _transform(self, img, seed):
            ignored = all(signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGINT, signal.SIGTERM))
            return torch.full((3, self.size, self.size), 255 * ignored, dtype=torch.uint8)

    s = small_splits(tmp_path)
    # a terminal's dispositions, whatever this test was launched with (a background job inherits SIGINT ignored)
    old = {sig: signal.signal(sig, h) for sig, h in ((signal.SIGINT, signal.default_int_handler),
                                                       (signal.SIGTERM, signal.SIG_DFL))}
    try:
        loader = TorchLoader(Dispositions(s.train, True, 32), s.y_train, 8, mean=(0, 0, 0), std=(1, 1, 1), workers=2)
        x = torch.cat([x for x, _ in loader])  # 255 / (std 1 * 255)
        assert (x == 1).all(), f"{int((x != 1).any(dim=(1, 2, 3)).sum())} images made by a worker that dies of Ctrl-C"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the main process must still see Ctrl-C"
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
