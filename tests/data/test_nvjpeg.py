"""The nvjpeg loader (torchvision batched decode): run on the CPU decoder here, on nvJPEG in the gpu cases."""
import warnings

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from data_files import write_jpegs, write_list
from loader_testing import check_train_epoch, labels_from_pixels, run_epoch, small_splits

from fastcbd.data import ArraySplits, BadInputError, build_loader, list_splits, resolve_loader
from fastcbd.data import dali as fdali
from fastcbd.data import nvjpeg
from fastcbd.data.augment import AugmentConfig, normalize_
from fastcbd.data.decode import decode_rgb
from fastcbd.data.nvjpeg import NvjpegLoader, crop_boxes, decode_batch, read_encoded
from fastcbd.data.samplers import ClassBalancedSampler, InstanceSampler
from fastcbd.train.config import load_config

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
gpu = [pytest.mark.gpu, pytest.mark.skipif("not torch.cuda.is_available()", reason="needs a CUDA GPU")]


def loader_for(splits, sampler=None, train=True, batch_size=8, aug=None, device="cpu", workers=0, **kw):
    return build_loader(splits, train, batch_size=batch_size, sampler=sampler, aug=aug or AugmentConfig(),
                        mean=MEAN, std=STD, device=device, loader="nvjpeg", workers=workers, **kw)


def corrupt(path):
    """A bogus Huffman table: the file still has its markers (check_bytes passes), decoders refuse it."""
    data = bytearray(open(path, "rb").read())
    dht = data.index(b"\xff\xc4")
    data[dht + 4 : dht + 21] = b"\xff" * 17
    open(path, "wb").write(bytes(data))


def truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def expected(images, mean=MEAN, std=STD):
    """Stack (3, S, S) uint8 images and normalise them as the loaders do."""
    x = torch.stack(images).float()
    return normalize_(x, torch.tensor(mean) * 255, torch.tensor(std) * 255)


@pytest.mark.parametrize("workers", [0, 2])
def test_train_batches_follow_the_sampler(tmp_path, workers):
    s = small_splits(tmp_path)
    smp = InstanceSampler(s.y_train, seed=2)
    loader = loader_for(s, smp, workers=workers)
    assert isinstance(loader, NvjpegLoader)
    check_train_epoch(loader, smp, s.y_train, MEAN, STD, 4, consumed=True)


def test_eval_equals_the_torch_loader(tmp_path):
    """Sequential order, short side to `resize`, centre crop: pixel for pixel the torch loader's batches."""
    s = small_splits(tmp_path)
    ours = list(loader_for(s, train=False, batch_size=3, workers=2))
    kw = dict(batch_size=3, aug=None, mean=MEAN, std=STD, device="cpu", workers=0)
    theirs = list(build_loader(s, False, loader="torch", **kw))
    assert len(ours) == len(theirs) == 3
    for k, ((x, y), (x2, y2)) in enumerate(zip(ours, theirs)):
        assert torch.equal(y, y2) and x.shape == x2.shape == (len(y), 3, 32, 32)
        diff = (x - x2).abs()
        assert torch.equal(x, x2), f"batch {k}: {int((diff > 0).sum())} values differ, worst {float(diff.max())}"
    cl = next(iter(loader_for(s, train=False, batch_size=3, channels_last=True)))[0]
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, ours[0][0])


def test_crop_boxes_are_inside_and_follow_the_ranges():
    sizes = torch.tensor([[375, 500], [40, 48], [1, 1], [7, 300], [300, 7], [333, 333]] * 50)
    aug = AugmentConfig(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3))
    g = torch.Generator().manual_seed(0)
    b = crop_boxes(sizes, aug, g)
    top, left, h, w, flip = b.unbind(1)
    H, W = sizes.unbind(1)
    inside = (top >= 0) & (left >= 0) & (h >= 1) & (w >= 1) & (top + h <= H) & (left + w <= W)
    assert inside.all(), f"boxes outside their image: {b[~inside][:5].tolist()} of {sizes[~inside][:5].tolist()}"
    big = (H >= 300) & (W >= 300)  # rounding is small there: area and ratio within the ranges
    area, ratio = (h * w / (H * W)).double(), (w / h).double()
    assert (area[big] >= 0.08 - 0.01).all() and (area[big] <= 1.0).all(), area[big].aminmax()
    assert (ratio[big] >= 0.75 - 0.01).all() and (ratio[big] <= 4 / 3 + 0.01).all(), ratio[big].aminmax()
    thin = (H == 7) & (W == 300)  # no try fits a 1:43 image: the centre crop at ratio 4/3
    assert (h[thin] == 7).all() and (w[thin] == 9).all() and (left[thin] == (300 - 9) // 2).all()
    assert 0.35 < flip.double().mean() < 0.65 and set(flip.tolist()) == {0, 1}
    # a fixed number of draws per image, whatever the sizes: the generator's position depends on n only
    g2 = torch.Generator().manual_seed(0)
    crop_boxes(torch.tensor([[1, 1]] * len(sizes)), aug, g2)
    assert torch.equal(g.get_state(), g2.get_state())
    assert torch.equal(b, crop_boxes(sizes, aug, torch.Generator().manual_seed(0)))
    assert (crop_boxes(sizes, AugmentConfig(flip=False), g)[:, 4] == 0).all()


def test_crops_and_flips_are_those_of_the_checkpointed_generator(tmp_path):
    """Whole-image crops of left-dark/right-bright images: every output is the resized image or its mirror,
    as the crop generator's flips say; then random crops equal TF.resized_crop of the drawn boxes."""
    s = small_splits(tmp_path)
    img = torch.zeros(3, 40, 48, dtype=torch.uint8)
    img[:, :, 24:] = 220
    for path in s.train.paths:
        open(path, "wb").write(encode(img, quality=95))
    whole = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.2, 1.2))
    decoded = [decode_rgb(open(p, "rb").read(), p) for p in s.train.paths]
    for aug in (whole, AugmentConfig(crop_scale=(0.2, 0.9))):
        loader = loader_for(s, batch_size=len(s.y_train), aug=aug)
        loader.load_state_dict({"gen": torch.Generator().manual_seed(1).get_state(),
                                "crop_gen": torch.Generator().manual_seed(5).get_state()})
        x, _ = next(iter(loader))
        boxes = crop_boxes(torch.tensor([[40, 48]] * len(decoded)), aug, torch.Generator().manual_seed(5))
        want = []
        for im, (top, left, h, w, flip) in zip(decoded, boxes.tolist()):
            c = TF.resized_crop(im, top, left, h, w, [32, 32], antialias=True)
            want.append(c.flip(-1) if flip else c)
        assert torch.equal(x, expected(want)), f"{aug}: the batch is not the drawn crops"
        if aug is whole:
            assert (boxes[:, :4] == torch.tensor([0, 0, 40, 48])).all(), boxes
            left_bright = x[:, :, :, :16].mean(dim=(1, 2, 3)) > x[:, :, :, 16:].mean(dim=(1, 2, 3))
            assert torch.equal(left_bright, boxes[:, 4].bool()), "mirrored images are not the flipped draws"
            assert 0 < int(left_bright.sum()) < len(s.y_train), "flips never or always drawn"


def encode(img, quality=90) -> bytes:
    from torchvision.io import encode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs (torchcodec is not installed)
        warnings.simplefilter("ignore", DeprecationWarning)
        return encode_jpeg(img, quality=quality).numpy().tobytes()


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_the_same_batches(tmp_path, workers):
    s = small_splits(tmp_path)
    aug = AugmentConfig(crop_scale=(0.2, 1.0), color_jitter=1.0, grayscale_p=0.3)

    def fresh(seed=9):
        smp = ClassBalancedSampler(s.y_train, seed=seed)
        return smp, loader_for(s, smp, batch_size=4, aug=aug, workers=workers, seed=3)

    smp, loader = fresh()
    smp.set_epoch(2)
    full = list(loader)
    smp, loader = fresh()
    smp.set_epoch(2)
    head = []
    for x, y in loader:
        head.append((x, y))
        if len(head) == 3:
            break
    sampler_state, loader_state = smp.state_dict(), loader.state_dict()
    assert sampler_state["consumed"] == 12
    smp, loader = fresh(seed=0)
    smp.load_state_dict(sampler_state)
    loader.load_state_dict(loader_state)
    tail = list(loader)  # no set_epoch: continue where it stopped
    assert len(head) + len(tail) == len(full) == 6
    for k, ((x, y), (x2, y2)) in enumerate(zip(full, head + tail)):
        assert torch.equal(y, y2) and torch.equal(x, x2), f"batch {k} differs after the resume"


def test_a_corrupt_jpeg_in_a_batch_is_named_or_skipped(tmp_path, monkeypatch, caplog):
    s = small_splits(tmp_path)
    bad, cut = s.train.paths[3], s.train.paths[5]
    corrupt(bad)
    calls = []
    batched = nvjpeg.decode_jpegs
    monkeypatch.setattr(nvjpeg, "decode_jpegs", lambda datas, device: calls.append(len(datas)) or batched(datas, device))
    smp = InstanceSampler(s.y_train, seed=1)
    with pytest.raises(BadInputError, match=f"{bad}: cannot decode image.*data.skip_bad=true"):
        run_epoch(loader_for(s, smp, batch_size=len(s.y_train)), smp)
    assert calls[0] == len(s.y_train) and set(calls[1:]) == {1}, f"batched then file by file: {calls}"
    truncate(cut)
    smp = InstanceSampler(s.y_train, seed=1)
    loader = loader_for(s, smp, skip_bad=True, workers=2)
    for epoch in (0, 1):
        labels, _ = run_epoch(loader, smp, epoch=epoch)
        smp.set_epoch(epoch)
        assert np.array_equal(labels, s.y_train[smp.draw()]), "a bad image must be replaced by one of its class"
    assert len(loader.skipped) == 2 and sorted(loader.bad) == sorted([bad, cut]), loader.skipped
    assert bad in caplog.text and f"{cut}: truncated JPEG" in caplog.text
    smp.set_epoch(2)
    x, y = next(iter(loader))
    assert torch.equal(labels_from_pixels(x, MEAN, STD, 4), y), "a stand-in of another class"
    corrupt(s.test.paths[1])
    ev = loader_for(s, train=False, batch_size=3, skip_bad=True)
    labels, _ = run_epoch(ev)
    assert np.array_equal(labels, np.delete(s.y_test, 1)) and len(ev.skipped) == 1


def test_decode_batch_names_each_bad_file_and_decodes_other_formats(tmp_path):
    from PIL import Image

    items = write_jpegs(tmp_path, [3], "a")
    paths = [str(tmp_path / rel) for rel, _ in items]
    corrupt(paths[1])
    Image.fromarray(np.full((5, 7, 3), 77, np.uint8)).save(tmp_path / "x.png")
    paths.append(str(tmp_path / "x.png"))
    out = decode_batch([read_encoded(p) for p in paths], paths, "cpu")
    assert isinstance(out[1], BadInputError) and str(out[1]).startswith(f"{paths[1]}: cannot decode image")
    assert out[0].shape == out[2].shape == (3, 40, 48) and out[3].shape == (3, 5, 7) and (out[3] == 77).all()
    assert torch.equal(out[0], decode_rgb(open(paths[0], "rb").read(), paths[0]))
    with pytest.raises(BadInputError, match="cannot read"):
        read_encoded(str(tmp_path / "missing.jpg"))


def test_auto_picks_nvjpeg_only_with_a_gpu_and_no_dali(tmp_path, monkeypatch):
    x, y = np.zeros((4, 8, 8, 1), np.uint8), np.arange(4) % 2
    files, arrays = small_splits(tmp_path), ArraySplits("arrays", x, y, x, y, 2)
    cuda = torch.device("cuda")  # no CUDA call: just a name
    for has_dali in (False, True):
        monkeypatch.setattr(fdali, "available", lambda has_dali=has_dali: has_dali)
        assert resolve_loader("auto", files, cuda) == ("dali" if has_dali else "nvjpeg")
        assert resolve_loader("auto", files, torch.device("cpu")) == "torch"
        assert resolve_loader("auto", arrays, cuda) == "device"
    assert resolve_loader("nvjpeg", files, torch.device("cpu")) == "nvjpeg"
    with pytest.raises(ValueError, match="loader=nvjpeg decodes image files"):
        resolve_loader("nvjpeg", arrays, cuda)
    assert load_config(None, ["data.loader=nvjpeg"]).data.loader == "nvjpeg"
    with pytest.raises(ValueError, match="nvjpeg"):
        load_config(None, ["data.loader=nvjpg"])


# ---- on a GPU: nvJPEG against the CPU decoder (FASTCBD_GPU_ONLY=1 keeps these) ----------------------------


def on_gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


def big_splits(root, n=24, seed=0, image_size=64):
    """ImageNet-like JPEGs: random sizes 200-450 x 250-600, smooth content + texture, quality 90, 4 classes."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        h, w = int(torch.randint(200, 451, (1,), generator=g)), int(torch.randint(250, 601, (1,), generator=g))
        img = torch.nn.functional.interpolate(torch.rand(1, 3, 5, 7, generator=g) * 255, size=(h, w), mode="bicubic")[0]
        img = (img + torch.randn(3, h, w, generator=g) * 10).clamp(0, 255).to(torch.uint8)
        open(root / f"img{i:03d}.jpg", "wb").write(encode(img))
        items.append((f"img{i:03d}.jpg", i % 4))
    write_list(root / "train.txt", items)
    write_list(root / "test.txt", items)
    return list_splits(str(root), "train.txt", "test.txt", image_size=image_size)


def pixel_gap(a, b, scale=1.0):
    """mean, 99.9th percentile and max of |a - b| * scale (in pixel levels)."""
    d = ((a.double().cpu() - b.double().cpu()).abs() * scale).flatten()
    return float(d.mean()), float(d.kthvalue(max(1, int(0.999 * len(d)))).values), float(d.max())


# nvJPEG and libjpeg-turbo differ by a few levels (IDCT, chroma upsampling); a wrong image, crop or channel
# order differs by tens on average
MEAN_GAP, P999_GAP = 1.5, 16


@on_gpu
def test_cuda_decode_matches_cpu(tmp_path):
    s = big_splits(tmp_path)
    datas = [read_encoded(p) for p in s.train.paths]
    cuda, cpu = decode_batch(datas, s.train.paths, "cuda"), decode_batch(datas, s.train.paths, "cpu")
    for p, a, b in zip(s.train.paths, cuda, cpu):
        assert a.device.type == "cuda" and a.dtype == torch.uint8 and a.shape == b.shape, (p, a.shape, b.shape)
        mean, p999, worst = pixel_gap(a, b)
        assert mean < MEAN_GAP and p999 <= P999_GAP, f"{p}: |cuda - cpu| mean {mean:.2f}, 99.9% {p999}, max {worst}"


@on_gpu
@pytest.mark.parametrize("train", [True, False])
def test_cuda_loader_matches_the_cpu_loader(tmp_path, train):
    """The same crop boxes (the CPU generator) on both devices: the batches differ by the decoders only."""
    s = big_splits(tmp_path)
    out = {}
    for device in ("cpu", "cuda"):
        smp = InstanceSampler(s.y_train, seed=4)
        loader = loader_for(s, smp if train else None, train=train, batch_size=10, device=device, workers=2,
                            aug=AugmentConfig(crop_scale=(0.25, 1.0)), channels_last=device == "cuda")
        out[device] = list(loader)
    assert len(out["cpu"]) == len(out["cuda"]) == 3
    for k, ((x, y), (xc, yc)) in enumerate(zip(out["cpu"], out["cuda"])):
        assert xc.device.type == "cuda" and xc.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y, yc.cpu()) and x.shape == xc.shape == (len(y), 3, 64, 64)
        mean, p999, worst = pixel_gap(x, xc, scale=STD[0] * 255)
        assert mean < MEAN_GAP and p999 <= P999_GAP, f"batch {k}: mean {mean:.2f}, 99.9% {p999:.1f}, max {worst:.1f}"


@on_gpu
def test_cuda_resume_and_bad_file_retry(tmp_path, caplog):
    from PIL import Image

    s = big_splits(tmp_path, n=16)
    bad = s.train.paths[2]
    corrupt(bad)
    Image.fromarray(np.full((50, 70, 3), 77, np.uint8)).save(s.train.paths[5], format="PNG")  # not a JPEG
    smp = InstanceSampler(s.y_train, seed=1)
    with pytest.raises(BadInputError, match=f"{bad}: cannot decode image"):
        run_epoch(loader_for(s, smp, batch_size=16, device="cuda"), smp)
    aug = AugmentConfig(crop_scale=(0.25, 1.0), color_jitter=1.0, grayscale_p=0.3)

    def fresh():
        smp = InstanceSampler(s.y_train, seed=1)
        return smp, loader_for(s, smp, batch_size=4, device="cuda", aug=aug, skip_bad=True, workers=2)

    smp, loader = fresh()
    full = list(loader)
    assert len(loader.skipped) == 1 and bad in caplog.text
    assert torch.equal(torch.cat([y for _, y in full]).cpu(), torch.from_numpy(s.y_train[smp.draw()]))
    smp, loader = fresh()
    head = [b for _, b in zip(range(2), loader)]  # range first: zip must not pull a third batch
    states = smp.state_dict(), loader.state_dict()
    smp, loader = fresh()
    smp.load_state_dict(states[0])
    loader.load_state_dict(states[1])
    for k, ((x, y), (x2, y2)) in enumerate(zip(full, head + list(loader))):
        assert torch.equal(y, y2) and torch.equal(x, x2), f"batch {k} differs after the resume on cuda"
