"""Random-resized crops of a list of differently sized images in a few batched GEMMs.

`TF.resized_crop(img, top, left, h, w, [S, S], antialias=True)` image by image costs ~6 kernel launches each
(crop, cast, antialiased interpolate, round, cast back, copy): at 128 images a batch the GPU loader spends
its time launching. The antialiased bilinear resize is separable and linear: out = Wy @ crop @ Wx^T with
Wy (S, h) and Wx (S, w) the interpolation weights, built here as PyTorch builds them for
`interpolate(mode="bilinear", antialias=True, align_corners=False)` (PIL's triangle filter, support
max(scale, 1), each row normalised to sum 1). The crops of a chunk of images are padded to its largest
crop (zero weights beyond each crop), so a chunk is two batched matmuls and a flip is a reversed Wx.
Results are rounded and clamped to the uint8 levels that torchvision's uint8 path returns: equal to it
within one level (float summation order), tested in tests/data/test_batch_resize.py.
"""
from __future__ import annotations

import torch

CHUNK_BYTES = 256 << 20  # fp32 padded crops per chunk: bounds the memory whatever the image sizes


def aa_weights(in_sizes: torch.Tensor, out_size: int, width: int, device) -> torch.Tensor:
    """(n, out_size, width) fp32: row i of image k holds the weights of input pixels 0..in_sizes[k]-1 for
    output pixel i (zero beyond in_sizes[k]), as aten's antialiased bilinear interpolation computes them."""
    n_in = in_sizes.to(device=device, dtype=torch.float64).view(-1, 1, 1)
    scale = n_in / out_size  # area_pixel_compute_scale without align_corners
    support = torch.where(scale >= 1.0, scale, torch.ones_like(scale))  # bilinear: interp_size / 2 = 1
    invscale = torch.where(scale >= 1.0, 1.0 / scale, torch.ones_like(scale))
    i = torch.arange(out_size, device=device, dtype=torch.float64).view(1, -1, 1)
    center = scale * (i + 0.5)
    xmin = torch.clamp(torch.trunc(center - support + 0.5), min=0)
    xmax = torch.minimum(torch.trunc(center + support + 0.5), n_in)
    j = torch.arange(width, device=device, dtype=torch.float64).view(1, 1, -1)
    w = torch.clamp(1.0 - ((j - center + 0.5) * invscale).abs(), min=0.0)
    w = torch.where((j >= xmin) & (j < xmax), w, torch.zeros_like(w))
    total = w.sum(-1, keepdim=True)
    w = torch.where(total != 0, w / torch.where(total != 0, total, torch.ones_like(total)), w)
    return w.float()


def _chunks(boxes: list[list[int]], channels: int) -> list[slice]:
    """Consecutive runs of images whose padded fp32 crops fit CHUNK_BYTES (at least one image each)."""
    out, start, hmax, wmax = [], 0, 0, 0
    for k, (_, _, h, w, _) in enumerate(boxes):
        nh, nw = max(hmax, h), max(wmax, w)
        if k > start and (k - start + 1) * channels * nh * nw * 4 > CHUNK_BYTES:
            out.append(slice(start, k))
            start, nh, nw = k, h, w
        hmax, wmax = nh, nw
    out.append(slice(start, len(boxes)))
    return out


def resized_crops(images: list[torch.Tensor], boxes: torch.Tensor, size: int, out: torch.Tensor) -> None:
    """out[k] = resized_crop(images[k], top, left, h, w, [size, size], antialias) rounded to uint8 levels,
    flipped left-right where boxes[k, 4] is 1. images: (C, H_k, W_k) uint8 on out's device; boxes (n, 5)
    int64 rows (top, left, h, w, flip) as crop_boxes returns them; out (n, C, size, size), any float or uint8
    dtype and memory format."""
    rows = boxes.tolist()
    dev = out.device
    for part in _chunks(rows, images[0].shape[0]):
        sel = rows[part]
        hmax, wmax = max(r[2] for r in sel), max(r[3] for r in sel)
        crops = torch.zeros((len(sel), images[0].shape[0], hmax, wmax), dtype=torch.uint8, device=dev)
        for k, (img, (top, left, h, w, _)) in enumerate(zip(images[part], sel)):
            crops[k, :, :h, :w] = img[:, top : top + h, left : left + w]
        hw = torch.tensor([[r[2], r[3]] for r in sel])
        wy = aa_weights(hw[:, 0], size, hmax, dev)  # (n, S, hmax)
        wx = aa_weights(hw[:, 1], size, wmax, dev)  # (n, S, wmax)
        flip = torch.tensor([bool(r[4]) for r in sel], device=dev).view(-1, 1, 1)
        wx = torch.where(flip, wx.flip(1), wx)  # a mirrored output column order
        y = torch.matmul(wy.unsqueeze(1), crops.float())  # (n, C, S, wmax)
        y = torch.matmul(y, wx.transpose(1, 2).unsqueeze(1))  # (n, C, S, S)
        out[part].copy_(y.round_().clamp_(0, 255))
