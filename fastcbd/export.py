"""`fastcbd export`: a model file's network as a self-contained artefact, checked after writing.

The network is folded into plain PyTorch (`Folded`): backbone -> projection (a student's Linear + ReLU)
-> f / ||f|| @ (sigma W / ||W||)^T with the normalised, scaled class vectors precomputed (a linear
classifier, tau-norm's, is kept as is), then logits * scale - shift (LWS's scales, post-hoc logit
adjustment's tau log pi; ones and zeros otherwise). Input: (B, C, H, W) float32 images normalised as the
model file's `input` record says (kept in each artefact's metadata); output (B, num_classes) logits.

- safetensors: the folded weights; the architecture, input and class names as JSON in the metadata
  (key "fastcbd"); `load_exported` rebuilds the module (needs fastcbd, and timm for timm backbones).
- pt2: a torch.export program with a dynamic batch: torch.export.load(FILE).module()(x); the same JSON
  as the extra file "fastcbd.json".
- onnx: torch.onnx.export (dynamo), dynamic batch, input "images", output "logits", weights inside the
  one file (a network over 2 GB would need external data); the JSON in the model's metadata_props. Needs onnx and onnxscript, and onnxruntime for the check.

Each artefact is loaded back and compared with the model file's network on a batch of another size than
the one exported with; the max abs logit difference is returned (and printed by the command).
"""
from __future__ import annotations

import json
import logging

import torch
import torch.nn.functional as F
from torch import nn

from fastcbd.errors import BadInputError, ConfigError

log = logging.getLogger("fastcbd")
FORMAT = "fastcbd.export/1"
FORMATS = ("safetensors", "pt2", "onnx")
NEEDS = {"safetensors": ("safetensors",), "pt2": (), "onnx": ("onnx", "onnxscript", "onnxruntime")}
EXPORT_BATCH, CHECK_BATCH = 2, 3


def require(fmt: str) -> None:
    """ImportError naming the packages --format needs when one is not installed."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    import importlib

    for name in NEEDS[fmt]:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ImportError(f"--format {fmt} needs the {', '.join(NEEDS[fmt])} package(s); {name} is not "
                              f"installed ({exc}): pip install 'fastcbd[export]'", name=name) from exc


class Folded(nn.Module):
    """(B, C, H, W) -> (B, num_classes): plain-PyTorch logits of a fastcbd network (see the module doc)."""

    def __init__(self, backbone: nn.Module, projection: nn.Module, weight: torch.Tensor, cosine: bool,
                 scale: torch.Tensor | None = None, shift: torch.Tensor | None = None):
        super().__init__()
        self.backbone, self.projection, self.cosine = backbone, projection, bool(cosine)
        c = weight.shape[0]
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("scale", torch.ones(c) if scale is None else scale.detach().float().clone())
        self.register_buffer("shift", torch.zeros(c) if shift is None else shift.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.projection(self.backbone(x))
        if self.cosine:
            f = F.normalize(f, dim=1)
        return F.linear(f, self.weight) * self.scale - self.shift


def fold(model: nn.Module) -> tuple[Folded, dict]:
    """(Folded copy of a load_model network, its head description for the metadata)."""
    import copy

    from fastcbd.models import Student, Teacher
    from fastcbd.models.heads import LWS, LinearHead, PostHocAdjusted

    model = copy.deepcopy(model).float().eval()
    scale = shift = None
    if isinstance(model, LWS):
        model, scale = model.model, model.scale
    elif isinstance(model, PostHocAdjusted):
        model, shift = model.model, model.tau * model.log_pi
    if isinstance(model, LinearHead):
        return Folded(model.backbone, nn.Identity(), model.classifier.weight, False).eval(), {"cosine": False}
    if not isinstance(model, (Student, Teacher)):
        raise BadInputError(f"cannot export a {type(model).__name__}")
    c = model.classifier
    weight = c.sigma * F.normalize(c.weight.detach().float(), dim=1)
    proj = model.projection if isinstance(model, Student) else nn.Identity()
    return Folded(model.backbone, proj, weight, True, scale, shift).eval(), {"cosine": True}


def rebuild(meta: dict) -> Folded:
    """An empty Folded of the architecture in an artefact's metadata (weights loaded by the caller)."""
    from fastcbd.models.backbones import build_backbone
    from fastcbd.models.cbd import backbone_kwargs

    arch = meta["arch"]
    backbone = build_backbone(arch["backbone"], arch["in_channels"], arch.get("width", 0), **backbone_kwargs(arch))
    proj = nn.Identity()
    if arch["role"] == "student":
        proj = nn.Sequential(nn.Linear(backbone.out_features, arch["proj_dim"]), nn.ReLU(inplace=True))
    dim = arch["proj_dim"] if arch["role"] == "student" else backbone.out_features
    return Folded(backbone, proj, torch.zeros(arch["num_classes"], dim), meta["head"]["cosine"])


def _example(meta: dict, batch: int) -> torch.Tensor:
    c, (h, w) = meta["input"]["channels"], meta["input"]["size"]
    return torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(batch))


def write(folded: Folded, meta: dict, fmt: str, out: str) -> None:
    import os

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    text = json.dumps(meta)
    x = _example(meta, EXPORT_BATCH)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in folded.state_dict().items()}, out, metadata={"fastcbd": text})
        return
    batch = torch.export.Dim("batch", min=1, max=65536)
    if fmt == "pt2":
        ep = torch.export.export(folded, (x,), dynamic_shapes={"x": {0: batch}})
        torch.export.save(ep, out, extra_files={"fastcbd.json": text})
        return
    import onnx

    for name in ("onnxscript", "onnx_ir"):  # their optimisation passes log every step at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.onnx.export(folded, (x,), out, dynamo=True, input_names=["images"], output_names=["logits"],
                      dynamic_shapes={"x": {0: batch}}, verbose=False, external_data=False)  # one file
    proto = onnx.load(out)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "fastcbd", text
    onnx.save(proto, out)


def load_exported(path: str, fmt: str | None = None):
    """(callable (B, C, H, W) float32 -> (B, C) logits, metadata dict) of an artefact written by `write`;
    fmt: safetensors | pt2 | onnx (default: from the file's extension, else pt2)."""
    fmt = fmt or next((f for f in FORMATS if path.endswith("." + f)), "pt2")
    if fmt == "safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, "pt") as f:
            meta = json.loads(f.metadata()["fastcbd"])
        net = rebuild(meta)
        net.load_state_dict(load_file(path))
        return net.eval(), meta
    if fmt == "onnx":
        import onnx
        import onnxruntime as ort

        meta = json.loads({p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}["fastcbd"])
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return (lambda x: torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])), meta
    extra = {"fastcbd.json": ""}
    ep = torch.export.load(path, extra_files=extra)
    return ep.module(), json.loads(extra["fastcbd.json"])


def export_model(model_path: str, fmt: str, out: str) -> dict:
    """Write the artefact, load it back, compare on CHECK_BATCH images; {'out', 'format', 'max_abs_diff'}."""
    from fastcbd.predict import model_input
    from fastcbd.train.checkpoint import load_model

    require(fmt)
    model, blob = load_model(model_path, "cpu")
    folded, head = fold(model)
    meta = {"format": FORMAT, "arch": blob["arch"], "head": head, "input": model_input(blob, model_path),
            "class_names": blob.get("class_names"), "source": {"model": model_path}}
    write(folded, meta, fmt, out)
    run, _ = load_exported(out, fmt)
    x = _example(meta, CHECK_BATCH)
    with torch.no_grad():
        want, got = model.float()(x), run(x)
    diff = float((want - got).abs().max())
    if not diff < 1e-3 * max(1.0, float(want.abs().max())):
        raise RuntimeError(f"{out}: the exported network differs from {model_path} by up to {diff:.3g} in a logit")
    return {"out": out, "format": fmt, "max_abs_diff": diff, "check_batch": CHECK_BATCH, "export_batch": EXPORT_BATCH}
