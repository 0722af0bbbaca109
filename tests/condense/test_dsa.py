"""DSA: one draw shared by the real and the synthetic batch, per-class draws in one batched call, seeded,
differentiable."""
import dataclasses
import math

import torch

from fastcbd.condense.dsa import DSA, DSAConfig


def _worst(a, b):
    d = (a - b).abs()
    return f"max |diff| {d.max().item():.3g} at {tuple(int(i) for i in torch.nonzero(d == d.max())[0])}"


def test_same_draw_same_transform_for_real_and_synthetic():
    aug = DSA(DSAConfig(mode="M"), seed=3)
    img = torch.rand(1, 3, 13, 11)
    real = torch.cat([img, torch.rand(4, 3, 13, 11)])  # the same image sits in both batches
    syn = torch.cat([torch.rand(2, 3, 13, 11), img])
    draw = aug.draw(1)
    a, b = aug(real, draw), aug(syn, draw)
    assert torch.allclose(a[0], b[2], atol=1e-6), _worst(a[0], b[2])
    assert not torch.allclose(a[0], img[0], atol=1e-3), "mode M with every operation must change the image"


def test_per_class_draws_batched_equal_the_loop():
    for mode in ("S", "M"):
        aug = DSA(DSAConfig(mode=mode), seed=5)
        x = torch.rand(9, 3, 10, 10, dtype=torch.float64)
        y = torch.tensor([2, 0, 1, 2, 2, 0, 1, 1, 0])
        draw = aug.draw(3)
        batched = aug(x, draw, y)
        for c in range(3):
            one = aug(x[y == c], draw, y[y == c])
            assert torch.allclose(batched[y == c], one, atol=1e-12), f"mode {mode} class {c}: {_worst(batched[y == c], one)}"


def test_seeded():
    x = torch.rand(6, 1, 12, 12)
    a, b = DSA(seed=11), DSA(seed=11)
    for _ in range(4):
        da, db = a.draw(6), b.draw(6)
        assert torch.equal(a(x, da), b(x, db))
    assert not torch.equal(a(x, a.draw(6)), DSA(seed=12)(x, DSA(seed=12).draw(6)))


def test_differentiable_in_the_images():
    aug = DSA(DSAConfig(mode="M"), seed=0)
    draw = aug.draw(2)
    x = torch.rand(2, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: aug(t, draw), (x,), eps=1e-6, atol=1e-5)


def test_flip_is_exact_mirror():
    cfg = DSAConfig(strategy="flip", mode="M")
    aug = DSA(cfg, seed=0)
    x = torch.rand(1, 1, 8, 9, dtype=torch.float64)
    for _ in range(10):
        d = aug.draw(1)
        out = aug(x, d)
        flipped = bool(d.theta[0, 0, 0] < 0)
        ref = x.flip(-1) if flipped else x
        assert torch.allclose(out, ref, atol=1e-12), f"flip={flipped}: {_worst(out, ref)}"


# --- each operation against an independent formulation (torchvision's functional transforms, or the DSA
# reference code's formula where torchvision defines the operation differently) ---------------------------
def _one(op, seed=1, **kw):
    cfg = DSAConfig(strategy=op, mode="M", **kw)
    d = DSA(cfg, seed=seed).draw(1)
    return cfg, d, lambda x, draw=d: DSA(cfg)(x, draw)


def _tv_affine(x, angle=0.0, translate=(0.0, 0.0), scale=1.0):
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import InterpolationMode

    return TF.affine(x, angle=angle, translate=list(translate), scale=scale, shear=[0.0, 0.0],
                     interpolation=InterpolationMode.BILINEAR)


def test_rotate_crop_and_scale_equal_torchvision_affine():
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)  # square: normalised coordinates = pixels up to a scale
    for seed in range(4):
        _, d, aug = _one("rotate", seed)
        deg = math.degrees(math.atan2(d.theta[0, 1, 0].item(), d.theta[0, 0, 0].item()))
        assert 0 < abs(deg) <= 15.0 + 1e-6, deg
        ref = _tv_affine(x, angle=-deg)  # theta maps output to input: the content turns the other way
        assert torch.allclose(aug(x), ref, atol=1e-6), f"rotate {deg:.2f} deg: {_worst(aug(x), ref)}"
        _, d, aug = _one("crop", seed)
        shift = d.theta[0, :, 2] * 16 / 2  # grid units (the image spans 2) -> pixels
        assert shift.abs().max() <= 0.125 * 16 + 1e-6, shift
        ref = _tv_affine(x, translate=(-shift[0].item(), -shift[1].item()))
        assert torch.allclose(aug(x), ref, atol=1e-6), f"crop {shift.tolist()}: {_worst(aug(x), ref)}"
        cfg, d, _ = _one("scale", seed)
        s = d.theta[0, 0, 0].item()
        assert 1 / 1.2 - 1e-6 <= s <= 1.2 + 1e-6 and 1 / 1.2 - 1e-6 <= d.theta[0, 1, 1].item() <= 1.2 + 1e-6
        d.theta[0, 1, 1] = s  # torchvision scales both axes alike; DSA draws them independently
        out = DSA(cfg)(x, d)
        ref = _tv_affine(x, scale=1 / s)
        assert torch.allclose(out, ref, atol=1e-6), f"scale {s:.3f}: {_worst(out, ref)}"


def test_colour_operations_follow_their_formulas():
    import torchvision.transforms.v2.functional as TF

    x = torch.rand(3, 3, 9, 7, dtype=torch.float64)
    gray = 0.3 + 0.4 * x[:, :1]  # torchvision clamps to [0, 1]: keep the contrast result inside
    for seed in range(3):
        _, d, _ = _one("color", seed)
        b, s, c = d.brightness[0].item(), d.saturation[0].item(), d.contrast[0].item()
        assert -0.5 <= b <= 0.5 and 0 <= s <= 2.0 and 0.5 <= c <= 1.5, (b, s, c)
        # contrast alone on one channel: torchvision's adjust_contrast (a blend with the image mean)
        only_c = dataclasses.replace(d, brightness=torch.zeros(1), saturation=torch.ones(1))
        ref = TF.adjust_contrast(gray, c)
        out = DSA(DSAConfig(strategy="color"))(gray, only_c)
        assert torch.allclose(out, ref, atol=1e-6), f"contrast {c:.3f}: {_worst(out, ref)}"
        # brightness and saturation: the DSA reference's definitions (additive; around the channel mean)
        y = x + b
        y = (y - y.mean(1, keepdim=True)) * s + y.mean(1, keepdim=True)
        m = y.mean((1, 2, 3), keepdim=True)
        ref = (y - m) * c + m
        out = DSA(DSAConfig(strategy="color"))(x, d)
        assert torch.allclose(out, ref, atol=1e-6), f"colour: {_worst(out, ref)}"


def test_cutout_erases_the_reference_square():
    """The DSA reference draws an integer offset in [0, size + 1 - side % 2) and zeroes the side x side box
    starting at offset - side // 2, clipped to the image: torchvision's erase of that box."""
    import torchvision.transforms.v2.functional as TF

    h, w = 12, 10
    x = torch.rand(1, 2, h, w, dtype=torch.float64) + 0.5  # no zeros of its own
    for seed in range(6):
        cfg, d, aug = _one("cutout", seed)
        ch, cw = int(h * cfg.cutout + 0.5), int(w * cfg.cutout + 0.5)
        oy = int(d.cut_center[0, 0] * (h + 1 - ch % 2))
        ox = int(d.cut_center[0, 1] * (w + 1 - cw % 2))
        assert 0 <= oy <= h - ch % 2 and 0 <= ox <= w - cw % 2
        top, left = max(oy - ch // 2, 0), max(ox - cw // 2, 0)
        bottom, right = min(oy - ch // 2 + ch, h), min(ox - cw // 2 + cw, w)
        ref = TF.erase(x, top, left, bottom - top, right - left, torch.zeros(()))
        out = aug(x)  # (through an identity grid_sample: equal up to rounding)
        box = f"rows {top}:{bottom}, cols {left}:{right}"
        assert torch.allclose(out, ref, atol=1e-12, rtol=0), f"seed {seed}: box {box}, {_worst(out, ref)}"
