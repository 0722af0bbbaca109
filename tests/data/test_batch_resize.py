"""fastcbd.data.batch_resize: batched random-resized crops equal torchvision's per-image resized_crop."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from fastcbd.data import batch_resize
from fastcbd.data.batch_resize import aa_weights, resized_crops


@pytest.mark.parametrize("n_in,n_out", [(37, 16), (16, 16), (9, 16), (200, 24), (5, 7), (1, 4)])
def test_weights_reproduce_antialiased_interpolate(n_in, n_out):
    """W @ x equals F.interpolate(bilinear, antialias=True) along one axis, for down-, same- and up-scaling."""
    x = torch.rand(3, 1, n_in, dtype=torch.float64)
    want = F.interpolate(x.view(3, 1, n_in, 1).expand(3, 1, n_in, 2), size=(n_out, 2), mode="bilinear",
                         antialias=True, align_corners=False)[..., 0]
    w = aa_weights(torch.tensor([n_in]), n_out, n_in + 3, "cpu").double()[0]  # padded: 3 zero columns
    assert torch.all(w[:, n_in:] == 0)
    got = (w[:, :n_in] @ x.view(3, n_in, 1)).view(3, 1, n_out)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _per_image(images, boxes, size):
    out = []
    for img, (top, left, h, w, flip) in zip(images, boxes.tolist()):
        y = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
        out.append(y.flip(-1) if flip else y)
    return torch.stack(out).float()


def _random_batch(seed, n=12):
    g = torch.Generator().manual_seed(seed)
    images, boxes = [], []
    for _ in range(n):
        H, W = (int(v) for v in torch.randint(5, 90, (2,), generator=g))
        images.append(torch.randint(0, 256, (3, H, W), generator=g, dtype=torch.uint8))
        h, w = int(torch.randint(1, H + 1, (1,), generator=g)), int(torch.randint(1, W + 1, (1,), generator=g))
        top, left = int(torch.randint(0, H - h + 1, (1,), generator=g)), int(torch.randint(0, W - w + 1, (1,), generator=g))
        boxes.append([top, left, h, w, int(torch.randint(0, 2, (1,), generator=g))])
    return images, torch.tensor(boxes)


@pytest.mark.parametrize("seed", range(4))
def test_batched_crops_equal_torchvision_within_one_level(seed):
    images, boxes = _random_batch(seed)
    size = 24
    want = _per_image(images, boxes, size)
    got = torch.empty((len(images), 3, size, size))
    resized_crops(images, boxes, size, got)
    diff = (got - want).abs()
    assert diff.max() <= 1.0, f"worst difference {float(diff.max())} levels"
    assert (diff > 0).float().mean() < 0.01, f"{float((diff > 0).float().mean()):.2%} of the values differ"
    assert torch.equal(got, got.round()) and got.min() >= 0 and got.max() <= 255


def test_chunks_bound_the_memory_and_keep_the_order(monkeypatch):
    images, boxes = _random_batch(7, n=9)
    whole = torch.empty((9, 3, 16, 16))
    resized_crops(images, boxes, 16, whole)
    rows = boxes.tolist()
    limit = 2 * 3 * max(r[2] for r in rows) * max(r[3] for r in rows) * 4  # two of the largest padded crops
    monkeypatch.setattr(batch_resize, "CHUNK_BYTES", limit)
    parts = batch_resize._chunks(rows, 3)
    assert len(parts) >= 2 and parts[0].start == 0 and parts[-1].stop == 9
    assert all(a.stop == b.start for a, b in itertools.pairwise(parts))
    for part in parts:
        sel = rows[part]
        padded = len(sel) * 3 * max(r[2] for r in sel) * max(r[3] for r in sel) * 4
        assert padded <= limit or len(sel) == 1, (part, padded, limit)
    chunked = torch.empty_like(whole)
    resized_crops(images, boxes, 16, chunked)
    assert torch.equal(chunked, whole)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batched_crops_on_the_gpu_equal_torchvision_there():
    """On CUDA (the loader's path): against torchvision's per-image resized_crop on the same GPU."""
    images, boxes = _random_batch(11, n=32)
    images = [img.cuda() for img in images]
    want = _per_image(images, boxes, 40)
    got = torch.empty((32, 3, 40, 40), device="cuda").contiguous(memory_format=torch.channels_last)
    resized_crops(images, boxes, 40, got)
    diff = (got - want).abs()
    assert diff.max() <= 1.0 and (diff > 0).float().mean() < 0.01, (float(diff.max()), float((diff > 0).float().mean()))
