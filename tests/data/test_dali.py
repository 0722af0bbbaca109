"""DALI pipelines on the CPU (device_id=None) over JPEG files the test writes."""
import numpy as np
import pytest
import torch
from data_files import chi2_critical, chi2_stat
from loader_testing import labels_from_pixels, run_epoch, small_splits

from fastcbd.data import BadInputError, build_loader
from fastcbd.data.augment import AugmentConfig
from fastcbd.data.samplers import ClassBalancedSampler, InstanceSampler

dali = pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install 'fastcbd[dali]')")

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def dali_loader(splits, sampler=None, train=True, batch_size=8, aug=None, **kw):
    return build_loader(splits, train, batch_size=batch_size, sampler=sampler, aug=aug or AugmentConfig(),
                        mean=MEAN, std=STD, device="cpu", loader="dali", workers=1, **kw)


@pytest.mark.parametrize("fused", [True, False])
def test_train_pipeline_follows_the_sampler(tmp_path, fused):
    from fastcbd.data.dali import DaliLoader

    s = small_splits(tmp_path)
    smp = InstanceSampler(s.y_train, seed=3)
    loader = DaliLoader(s.train, 8, sampler=smp, aug=AugmentConfig(crop_scale=(0.5, 1.0)), mean=MEAN, std=STD,
                        fused=fused, size=32, num_threads=1)
    smp.set_epoch(1)
    expected = s.y_train[smp.indices()]
    batches = list(loader)
    labels = torch.cat([y for _, y in batches]).numpy()
    assert np.array_equal(labels, expected)
    assert [tuple(x.shape) for x, _ in batches] == [(8, 3, 32, 32)] * 2 + [(7, 3, 32, 32)]
    x, y = batches[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(labels_from_pixels(x, MEAN, STD, 4), y), "decoded images do not match their labels"


def test_class_balanced_draw_and_second_epoch(tmp_path):
    s = small_splits(tmp_path)
    smp = ClassBalancedSampler(s.y_train, num_samples=400, seed=0)
    loader = dali_loader(s, smp, batch_size=50)
    a, shapes = run_epoch(loader, smp, epoch=0)
    stat = chi2_stat(np.bincount(a, minlength=4), np.full(4, 0.25))
    assert stat < chi2_critical(3), f"chi2 {stat:.1f}: {np.bincount(a).tolist()}"
    b, _ = run_epoch(loader, smp, epoch=1)  # the same pipeline, re-fed with the next epoch's draw
    smp.set_epoch(1)
    assert np.array_equal(b, s.y_train[smp.draw()]) and len(shapes) == 8


def test_aug_teacher_ops_fp16_and_channels_last(tmp_path):
    from fastcbd.data.dali import DaliLoader

    s = small_splits(tmp_path)
    aug = AugmentConfig(crop_scale=(0.3, 1.0), color_jitter=1.0, grayscale_p=0.5)
    loader = DaliLoader(s.train, 8, sampler=InstanceSampler(s.y_train), aug=aug, mean=MEAN, std=STD, size=32,
                        fp16=True, channels_last=True, num_threads=1)
    x, _ = next(iter(loader))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float16 and torch.isfinite(x).all()
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_grayscale_always_gives_gray_images(tmp_path):
    from fastcbd.data.dali import DaliLoader

    s = small_splits(tmp_path)
    aug = AugmentConfig(grayscale_p=1.0)
    x, _ = next(iter(DaliLoader(s.train, 8, sampler=InstanceSampler(s.y_train), aug=aug, mean=MEAN, std=STD,
                                size=32, num_threads=1)))
    spread = (x.max(dim=1).values - x.min(dim=1).values).abs().max().item()
    assert spread < 0.1, f"channels differ by {spread} after grayscale (p=1)"


def test_eval_pipeline(tmp_path):
    s = small_splits(tmp_path)
    loader = dali_loader(s, train=False, batch_size=3)
    labels, shapes = run_epoch(loader)
    assert np.array_equal(labels, s.y_test) and shapes == [(3, 3, 32, 32)] * 2 + [(2, 3, 32, 32)]


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharding_by_rank(tmp_path, world_size):
    s = small_splits(tmp_path)
    shares = []
    for rank in range(world_size):
        smp = ClassBalancedSampler(s.y_train, seed=5, rank=rank, world_size=world_size)
        shares.append(run_epoch(dali_loader(s, smp, batch_size=4), smp)[0])
    full = s.y_train[ClassBalancedSampler(s.y_train, seed=5, world_size=world_size).draw()]
    assert np.array_equal(np.stack(shares, 1).reshape(-1), full)


def test_resume_mid_epoch(tmp_path):
    s = small_splits(tmp_path)
    full_smp = ClassBalancedSampler(s.y_train, seed=9)
    full, _ = run_epoch(dali_loader(s, full_smp, batch_size=4), full_smp, epoch=2)
    smp = ClassBalancedSampler(s.y_train, seed=9)
    loader = dali_loader(s, smp, batch_size=4)
    head, _ = run_epoch(loader, smp, epoch=2, stop_after=2)
    resumed = ClassBalancedSampler(s.y_train)
    resumed.load_state_dict(smp.state_dict())
    tail, _ = run_epoch(dali_loader(s, resumed, batch_size=4))
    assert np.array_equal(np.concatenate([head, tail]), full)
    rest, _ = run_epoch(loader)  # the interrupted loader itself also continues correctly
    assert np.array_equal(np.concatenate([head, rest]), full)


def test_truncated_jpeg_names_the_file_or_is_skipped(tmp_path, caplog):
    s = small_splits(tmp_path)
    bad = s.train.paths[2]
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[: len(data) // 2])
    smp = InstanceSampler(s.y_train)
    with pytest.raises(BadInputError, match=f"{bad}: truncated JPEG"):
        run_epoch(dali_loader(s, smp), smp)
    smp = InstanceSampler(s.y_train)
    loader = dali_loader(s, smp, skip_bad=True)
    labels, _ = run_epoch(loader, smp)
    assert np.array_equal(labels, s.y_train[smp.draw()]) and len(loader.skipped) == 1 and bad in caplog.text


def test_corrupt_jpeg_that_dali_rejects_is_named(tmp_path, caplog):
    s = small_splits(tmp_path)
    bad = s.train.paths[5]
    open(bad, "wb").write(b"\xff\xd8" + b"\x00" * 64 + b"\xff\xda" + b"\x13" * 64 + b"\xff\xd9")
    smp = InstanceSampler(s.y_train)
    with pytest.raises(BadInputError, match=f"{bad}: cannot decode"):
        run_epoch(dali_loader(s, smp), smp)
    smp = InstanceSampler(s.y_train)
    loader = dali_loader(s, smp, skip_bad=True)
    labels, _ = run_epoch(loader, smp)  # rebuilt after the failure, resumed from the sampler: nothing lost
    assert np.array_equal(labels, s.y_train[smp.draw()]) and bad in caplog.text


def test_native_file_reader_shards(tmp_path):
    """DALI's own reader (instance sampling only): the shards of 20 files are disjoint and cover them."""
    from fastcbd.data.dali import build_pipeline, to_torch

    s = small_splits(tmp_path)
    files, labels = s.train.paths[:20], s.y_train[:20].tolist()
    seen = []
    for rank in range(2):
        reader = dict(files=files, labels=labels, shard_id=rank, num_shards=2, random_shuffle=True, seed=rank)
        pipe = build_pipeline(None, train=True, batch_size=5, device_id=None, num_threads=1, size=32, reader=reader)
        seen += [to_torch(pipe.run()[1], torch.device("cpu")).view(-1) for _ in range(2)]
    assert sorted(torch.cat(seen).tolist()) == sorted(labels)


def _window_reference(h, w, u, aug):
    """torchvision's RandomResizedCrop rule in relative coordinates, float64, from the 4 uniforms (area,
    log-ratio, top, left) of each try: ((x, y), (w, h)) in "WH" order."""
    aspect = w / h
    (s0, s1), (r0, r1) = aug.crop_scale, aug.crop_ratio
    for ua, ur, ut, ul in u.reshape(-1, 4):
        area, ratio = s0 + ua * (s1 - s0), np.exp(np.log(r0) + ur * (np.log(r1) - np.log(r0)))
        cw, ch = np.sqrt(area * ratio / aspect), np.sqrt(area / ratio * aspect)
        if cw <= 1 and ch <= 1:
            return (ul * (1 - cw), ut * (1 - ch)), (cw, ch)
    lo, hi = min(r0, r1), max(r0, r1)
    cw, ch = min(hi / aspect, 1.0), min(aspect / lo, 1.0)
    return ((1 - cw) / 2, (1 - ch) / 2), (cw, ch)


@pytest.mark.parametrize("aug", [AugmentConfig(), AugmentConfig(crop_scale=(0.9, 1.0))], ids=["scale0.35", "scale0.9"])
def test_crop_windows_follow_the_random_resized_crop_rule(aug):
    """The in-pipeline crop window (from the fed draws and the encoded image's shape) is the first try
    that fits, else the centred fallback cut to the ratio range, for square, wide and tall images."""
    from data_files import jpeg_bytes
    from nvidia.dali import fn, pipeline_def, types

    from fastcbd.data.dali import ATTEMPTS, _crop_window, sample_draws
    from fastcbd.data.samplers import sample_uniforms

    shapes = [(40, 48), (8, 64), (64, 8), (30, 30), (24, 40), (48, 20)] * 2
    jpegs = [np.frombuffer(jpeg_bytes(1, h, w), np.uint8) for h, w in shapes]
    seeds = np.arange(100, 100 + len(shapes))
    crop = sample_draws(seeds, aug)[:4]
    uniforms = sample_uniforms(seeds, 4 * ATTEMPTS)

    @pipeline_def(batch_size=len(shapes), num_threads=1, device_id=None)
    def windows():
        encoded = fn.external_source(source=lambda: jpegs, batch=True, dtype=types.UINT8)
        tries = fn.external_source(source=lambda: crop, num_outputs=4, batch=True, dtype=types.FLOAT)
        return _crop_window(fn, types, encoded, tries, aug)

    pipe = windows()
    pipe.build()
    anchor, shape = (t.as_array() for t in pipe.run())
    fallback = 0
    for k, (h, w) in enumerate(shapes):
        (x, y), (cw, ch) = _window_reference(h, w, uniforms[k], aug)
        fallback += (x, y) == ((1 - cw) / 2, (1 - ch) / 2)
        assert np.allclose(anchor[k], [x, y], atol=1e-5) and np.allclose(shape[k], [cw, ch], atol=1e-5), (
            f"image {h}x{w}: window {anchor[k]} {shape[k]}, expected {(x, y)} {(cw, ch)}")
    assert fallback >= (4 if aug.crop_scale[0] == 0.9 else 0), "the 8:1 images should fall back to the centre"


@pytest.mark.parametrize("fused", [True, False])
def test_resume_mid_epoch_gives_the_same_images(tmp_path, fused):
    """Each sample's crop, flip and colour come from the seed of its position in the epoch: a loader
    resumed from a mid-epoch sampler state yields the unbroken run's batches bit for bit; a rebuilt
    pipeline (a new loader) gives the same epoch as a reused one; a repeated image gets another crop."""
    from fastcbd.data.dali import DaliLoader

    s = small_splits(tmp_path)
    aug = AugmentConfig(crop_scale=(0.2, 1.0), color_jitter=1.0, grayscale_p=0.3)

    def fresh(seed=4):
        smp = ClassBalancedSampler(s.y_train, seed=seed)  # with replacement: images repeat within the epoch
        return smp, DaliLoader(s.train, 5, sampler=smp, aug=aug, mean=MEAN, std=STD, size=16, num_threads=1,
                               seed=11, fused=fused)

    smp, reused = fresh()
    for epoch in range(2):
        smp.set_epoch(epoch)
        first = list(reused)  # epoch 1 from the pipeline that ran epoch 0
    smp, loader = fresh()
    smp.set_epoch(1)
    full = list(loader)
    order = smp.draw()
    xs = torch.cat([x for x, _ in full])
    p, q = next((p, q) for p in range(len(order)) for q in range(p + 1, len(order)) if order[p] == order[q])
    assert not torch.equal(xs[p], xs[q]), f"image {order[p]} at positions {p} and {q} got the same crop"

    smp, loader = fresh()
    smp.set_epoch(1)
    head = run_batches(loader, 2)
    state = smp.state_dict()
    assert state["consumed"] == 10
    resumed_smp, resumed = fresh(seed=0)
    resumed_smp.load_state_dict(state)
    tail = list(resumed)  # no set_epoch: continue where it stopped
    rest = list(loader)  # the interrupted loader itself, its pipeline rebuilt, continues the same way
    for name, got in (("reused pipeline", first), ("resumed", head + tail), ("continued", head + rest)):
        assert len(got) == len(full) == 5, (name, len(got))
        for k, ((x, y), (x2, y2)) in enumerate(zip(full, got)):
            bad = (x != x2).sum().item()
            assert torch.equal(y, y2) and bad == 0, f"{name}: batch {k} differs ({bad} values)"


def run_batches(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out
