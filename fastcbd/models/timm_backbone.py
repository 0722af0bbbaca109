"""timm feature extractors as fastcbd backbones: `model.backbone=timm:<name>` (pip install fastcbd[timm]).

The network is `timm.create_model(name, num_classes=0, pretrained=False, in_chans=C, **model.timm_kwargs)`:
nothing is ever downloaded. Its input follows the dataset (channels and image size); models with a fixed
input size (ViT, DeiT, Swin, ...) get `img_size`, and a ViT whose patch does not divide the image gets the
largest patch that does (logged; give `patch_size` in model.timm_kwargs to choose). The feature width is
measured with a dummy forward (`num_features` is not the pooled width of every timm model, e.g. MobileNetV3).

Small images (28 px MNIST-LT, 32 px CIFAR): networks that downsample 32x or more with unpadded stages
(ConvNeXt, DenseNet, ...) reduce them to nothing and are refused by that forward. The ResNets (resnet10t,
resnet18, resnet50), RegNets, EfficientNet / MobileNetV3 and ViT / DeiT / Swin with img_size take them.

`model.weights=FILE` loads local weights (.safetensors, or a state dict read with weights_only=True; a
`{'state_dict': ...}` / `{'model': ...}` checkpoint or a fastcbd model file also work) through timm's
own loading: a classifier head is dropped, a 3-channel stem is adapted to the dataset's channels, a ViT's
position embedding is resampled. Keys that still do not match are refused, by name.
"""
from __future__ import annotations

import difflib
import logging
import sys

import torch
from torch import nn

from fastcbd.errors import BadInputError, ConfigError

PREFIX = "timm:"
SMALL_IMAGES = ("resnet10t, resnet18, resnet50, regnetx_002, efficientnet_b0, mobilenetv3_small_100, "
                "vit_small_patch16_224 / deit_tiny_patch16_224 (img_size and patch size set from the data)")
log = logging.getLogger("fastcbd")


def require_timm():
    try:
        import timm
    except ImportError as exc:
        raise ImportError(f"model.backbone=timm:... needs the timm package ({exc}): pip install 'fastcbd[timm]' "
                          "(or pip install timm)", name="timm") from exc
    return timm


def _check_name(timm, name: str) -> None:
    if name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        raise ConfigError(f"model.backbone=timm:{name}: fastcbd never downloads weights; give the architecture's "
                         "name and the weights as a local file (model.weights=FILE)")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"model.backbone=timm:{name}: timm {timm.__version__} has no model of that name{hint} "
                         "(list them with python -c \"import timm; print(timm.list_models('*vit*'))\")")


def _divisor_below(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def resolve_kwargs(timm, name: str, in_channels: int, image_size, options: dict | None) -> dict:
    """The create_model keyword arguments (without num_classes / pretrained) for this data."""
    if options is not None and not isinstance(options, dict):
        raise ConfigError(f"model.timm_kwargs must be a mapping (e.g. '{{patch_size: 7}}'), got {options!r}")
    kw = dict(options or {})
    if kw.pop("pretrained", False) or "pretrained_cfg_overlay" in kw:
        raise ConfigError(f"timm:{name}: pretrained weights are never downloaded by fastcbd. Save them on a machine "
                         "that can download (timm.create_model(name, pretrained=True).state_dict(), or the "
                         ".safetensors file of the model's hub page) and pass model.weights=FILE")
    for key in ("num_classes", "in_chans"):
        if key in kw:
            raise ConfigError(f"model.timm_kwargs.{key}: set by fastcbd (the features are pooled, the channels "
                             "follow the dataset); remove it")
    kw["in_chans"] = int(in_channels)
    cfg = timm.models.get_pretrained_cfg(name)
    if image_size is not None and cfg is not None and cfg.fixed_input_size and "img_size" not in kw:
        kw["img_size"] = list(image_size) if image_size[0] != image_size[1] else int(image_size[0])
    return kw


class TimmBackbone(nn.Module):
    """(B, C, H, W) -> (B, out_features) pooled features of a timm model (random init or model.weights)."""

    def __init__(self, name: str, in_channels: int = 3, image_size=None, options: dict | None = None,
                 weights: str = ""):
        super().__init__()
        timm = require_timm()
        _check_name(timm, name)
        self.name = name
        kw = resolve_kwargs(timm, name, in_channels, image_size, options)
        net = self._create(timm, name, kw, image_size)
        patch = getattr(getattr(net, "patch_embed", None), "patch_size", None)
        if image_size is not None and patch is not None and "patch_size" not in (options or {}):
            fit = [_divisor_below(int(s), int(p)) for s, p in zip(image_size, patch)]
            if fit != list(patch):
                log.warning("timm:%s: patch %s does not divide the %sx%s images; using patch_size %s "
                            "(model.timm_kwargs.patch_size chooses another)", name, tuple(patch), *image_size, fit[0])
                kw["patch_size"] = fit[0] if fit[0] == fit[1] else fit
                net = self._create(timm, name, kw, image_size)
        self.kwargs = kw
        if weights:
            load_weights(net, weights, name, in_channels)
        self.net = net
        self.out_features = self._measure(in_channels, image_size)

    @staticmethod
    def _create(timm, name: str, kw: dict, image_size) -> nn.Module:
        try:
            return timm.create_model(name, pretrained=False, num_classes=0, **kw)
        except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
            raise ConfigError(f"timm:{name} cannot be built with {kw} for {image_size} images: "
                             f"{type(exc).__name__}: {exc}") from exc

    def _measure(self, in_channels: int, image_size) -> int:
        h, w = image_size if image_size is not None else (224, 224)
        training = self.net.training
        try:
            with torch.no_grad():
                out = self.net.eval()(torch.zeros(2, in_channels, h, w))
        except (RuntimeError, AssertionError, ValueError) as exc:
            raise ConfigError(f"timm:{self.name} cannot take {h}x{w} images ({type(exc).__name__}: {str(exc)[:200]}); "
                             f"networks that suit small images: {SMALL_IMAGES}") from exc
        finally:
            self.net.train(training)
        if out.ndim != 2 or out.shape[1] == 0:
            raise ConfigError(f"timm:{self.name} with num_classes=0 returns {tuple(out.shape)} for a batch of 2, "
                             "not (2, D) pooled features")
        return int(out.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def read_state_dict(path: str) -> dict:
    """A state dict from .safetensors or a torch file (weights_only=True), unwrapped from a checkpoint."""
    import os

    if not os.path.exists(path):
        raise FileNotFoundError(f"model.weights={path}: no such file")
    try:
        if path.endswith(".safetensors"):
            try:
                from safetensors.torch import load_file
            except ImportError as exc:
                raise ImportError(f"model.weights={path}: .safetensors needs the safetensors package "
                                  "(pip install safetensors)", name="safetensors") from exc
            blob = load_file(path, device="cpu")
        else:
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise
    except Exception as exc:
        raise BadInputError(f"model.weights={path}: not a readable weights file ({type(exc).__name__}: {exc})") from exc
    if isinstance(blob, dict) and str(blob.get("format", "")).startswith("fastcbd.model/"):
        blob = {k[len("backbone.net."):]: v for k, v in blob["state_dict"].items() if k.startswith("backbone.net.")}
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
            break
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise BadInputError(f"model.weights={path}: expected a state dict (name -> tensor)")
    return {k.removeprefix("module."): v for k, v in blob.items()}


def load_weights(net: nn.Module, path: str, name: str, in_channels: int) -> None:
    """Load `path` into a timm model with timm's own adaptation (timm.models.load_pretrained from a state
    dict: never a download); unmatched keys or shapes raise BadInputError naming them."""
    from timm.models import load_pretrained

    state = read_state_dict(path)
    cfg = dict(getattr(net, "pretrained_cfg", None) or {})
    heads = cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    head_keys = {f"{h}.{p}" for h in heads for p in ("weight", "bias")}
    module_filter = getattr(sys.modules.get(type(net).__module__), "checkpoint_filter_fn", None)

    def check(sd, model):
        if module_filter is not None:
            try:
                sd = module_filter(sd, model)
            except TypeError:
                sd = module_filter(sd)
        expected = set(model.state_dict())
        missing = sorted(expected - set(sd))
        unexpected = sorted(set(sd) - expected - head_keys)
        if missing or unexpected:
            raise BadInputError(f"model.weights={path} does not fit timm:{name}: "
                             f"{len(missing)} missing key(s) {missing[:8]}, "
                             f"{len(unexpected)} unexpected {unexpected[:8]}")
        return sd

    cfg.update(state_dict=state, file=None, url=None, hf_hub_id=None, source="", custom_load=False)
    cfg.setdefault("num_classes", -1)  # != 0: timm then drops the classifier keys listed in the cfg
    try:
        load_pretrained(net, pretrained_cfg=cfg, num_classes=0, in_chans=in_channels, filter_fn=check, strict=True)
    except RuntimeError as exc:
        raise BadInputError(f"model.weights={path} does not fit timm:{name} with {in_channels} channel(s): {exc}") from exc
    log.info("timm:%s: weights from %s", name, path)
