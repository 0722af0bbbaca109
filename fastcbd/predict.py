"""`fastcbd predict`: the top-k classes of images (JPEG, PNG, ... files, folders of them, .npz arrays) by a
model file, through the evaluation transform the model was tested with, in batches, on the CPU or a GPU.

The model file's `input` record (fastcbd.train.model_info) gives the transform: in-memory datasets
(MNIST-LT, CIFAR-LT, .npz) used images at their own size, so an image of another size is resized to it;
image-file datasets resize the short side to `resize` and centre-crop `size`. Then /255, minus mean, over
std. An image with 3 channels for a 1-channel model is converted to luma as PIL's "L" does (ITU-R 601,
rounded: a gray image decoded as RGB comes back exactly).
Unreadable images are reported by name and skipped.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

from fastcbd.errors import BadInputError, ConfigError

log = logging.getLogger("fastcbd")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def gather(items) -> list[str]:
    """Files and folders -> files: a folder gives its images and .npz files (recursively, sorted); a
    named file is kept whatever its extension (it is reported if it cannot be read)."""
    out = []
    for item in items:
        if os.path.isdir(item):
            for dirpath, dirs, files in os.walk(item, followlinks=True):
                dirs.sort()
                out += [os.path.join(dirpath, f) for f in sorted(files)
                        if f.lower().endswith(IMAGE_EXTENSIONS + (".npz",))]
        else:
            out.append(item)
    return out


def read_images(path: str) -> list[tuple[str, torch.Tensor]]:
    """[(name, (C, H, W) uint8)]: one per image file; one per image of each uint8 image array of an .npz
    (x_train, x_test, x, images: N x H x W [x C]), named file.npz:key[i]. BadInputError names the file."""
    if path.lower().endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files if k.startswith("x") or k == "images"}
        except Exception as exc:
            raise BadInputError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc
        out = []
        for key, x in arrays.items():
            if x.dtype != np.uint8 or x.ndim not in (3, 4):
                continue
            x = torch.from_numpy(x if x.ndim == 4 else x[..., None]).permute(0, 3, 1, 2)
            out += [(f"{path}:{key}[{i}]", img) for i, img in enumerate(x)]
        if not out:
            raise BadInputError(f"{path}: no uint8 image array (N x H x W [x C]) named x_* or images")
        return out
    from fastcbd.data.decode import decode_rgb, read_bytes

    return [(path, decode_rgb(read_bytes(path), path))]


class EvalTransform:
    """(C, H, W) uint8 -> (channels, h, w) float32, normalised as in the model's evaluation."""

    def __init__(self, info: dict):
        self.channels, self.size = int(info["channels"]), [int(s) for s in info["size"]]
        self.resize = info.get("resize")
        self.mean = torch.tensor(info["mean"], dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(info["std"], dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        import torchvision.transforms.v2.functional as TF

        if img.shape[0] == 4:
            img = img[:3]
        if self.channels == 1 and img.shape[0] == 3:  # PIL's "L": (299 R + 587 G + 114 B) / 1000, rounded
            w = torch.tensor([299, 587, 114], dtype=torch.int32).view(3, 1, 1)
            luma = (img.to(torch.int32) * w).sum(0, keepdim=True) + 500
            img = luma.div(1000, rounding_mode="floor").to(torch.uint8)
        elif self.channels == 3 and img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        if self.resize:
            img = TF.center_crop(TF.resize(img, self.resize, antialias=True), self.size)
        elif list(img.shape[-2:]) != self.size:
            img = TF.resize(img, self.size, antialias=True)
        return (img.float() / 255 - self.mean) / self.std


def model_input(blob: dict, path: str) -> dict:
    info = blob.get("input")
    if not info:
        raise BadInputError(f"{path} was written before model files recorded their input (size, normalisation); "
                         "predict and export need it: train the model again with this version of fastcbd")
    return info


def predict(model_path: str, inputs, topk: int = 5, batch_size: int = 64, device: str = "auto") -> dict:
    """{'predictions': [{'file', 'top': [{'class', 'name', 'prob'}]}], 'unreadable': [{'file', 'error'}]}."""
    from fastcbd.train.checkpoint import load_model

    if topk < 1 or batch_size < 1:
        raise ConfigError(f"--topk {topk} / --batch-size {batch_size}: both must be at least 1")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    model, blob = load_model(model_path, dev)
    transform = EvalTransform(model_input(blob, model_path))
    names = blob.get("class_names")
    files = gather(inputs)
    if not files:
        raise FileNotFoundError(f"no image or .npz file in {' '.join(inputs)}")
    preds, bad, batch = [], [], []

    def run():
        with torch.inference_mode():
            probs = torch.softmax(model(torch.stack([x for _, x in batch]).to(dev)).float(), dim=1).cpu()
        p, idx = probs.topk(min(topk, probs.shape[1]), dim=1)
        for (name, _), pr, ix in zip(batch, p.tolist(), idx.tolist()):
            preds.append({"file": name, "top": [{"class": c, "name": names[c] if names else None, "prob": q}
                                                for c, q in zip(ix, pr)]})
        batch.clear()

    for path in files:
        try:
            items = read_images(path)
        except (BadInputError, OSError) as exc:
            bad.append({"file": path, "error": str(exc)})
            log.warning("skipped %s", exc)
            continue
        for name, img in items:
            batch.append((name, transform(img)))
            if len(batch) == batch_size:
                run()
    if batch:
        run()
    if not preds:
        raise BadInputError(f"none of the {len(files)} input file(s) could be read: "
                         + "; ".join(b["error"] for b in bad[:5]))
    return {"model": model_path, "predictions": preds, "unreadable": bad}


def format_text(result: dict) -> str:
    lines = []
    for p in result["predictions"]:
        top = "  ".join(f"{t['class']}{' ' + t['name'] if t['name'] is not None else ''} {t['prob']:.3f}"
                        for t in p["top"])
        lines.append(f"{p['file']}\t{top}")
    return "\n".join(lines)
