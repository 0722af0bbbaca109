"""Fuzzing the train-side readers (hypothesis): config files with key=value overrides, and model files.

Whatever the input, load_config returns a Config whose every key has its default's type (no mapping where a
number is expected, no NaN), or raises ConfigError naming the file and the key; load_model returns a model
or raises BadInputError naming the file and the field. Nothing else escapes. A few hundred inputs each here;
benchmarks/fuzz_readers.py runs 10,000.
"""
import io
import math

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastcbd.errors import BadInputError, ConfigError, UserError
from fastcbd.train.checkpoint import load_model
from fastcbd.train.config import Config, load_config, to_dict

FUZZ = settings(max_examples=250, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


DEFAULTS = leaves(to_dict(Config()))
KEYS = sorted(DEFAULTS)


def same_type(value, default) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        ok = isinstance(value, type(default)) and not isinstance(value, bool)
        return ok and (not isinstance(value, float) or math.isfinite(value))
    if isinstance(default, list):
        return isinstance(value, list) and (not default or all(same_type(v, default[0]) for v in value))
    return isinstance(value, type(default))


YAML_TEXT = st.sampled_from(["1", "-1", "0", "2.5", "1e3", "1e-3", ".inf", ".nan", "true", "on", "no", "null", "~", "",
                             "x", "'3'", "[1, 2]", "[0.5, 1.0]", "[vanilla, aug]", "[[1]]", "{a: 1}", "{}", "[", "]",
                             "0x10", "1_000", "99999999999999999999999", "!!python/object:os.system", "&a [*a]",
                             "a: b: c", "\u00e9", "- 1", "9" * 400, "9" * 5000]) | st.text(max_size=8)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.just(10**400), st.floats(),
                    st.text(max_size=6))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                          max_size=2), max_leaves=5)


def nest(pairs) -> dict:
    """[('data.rho', 3), ...] -> {'data': {'rho': 3}}; a later pair that collides with an earlier one wins."""
    out: dict = {}
    for key, value in pairs:
        node = out
        *parents, last = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[last] = value
    return out


CONFIG_KEYS = st.sampled_from(KEYS) | st.sampled_from(["data", "teacher.optim", "nope", "data.nope", "seed.x"])
DOCS = st.one_of(st.lists(st.tuples(CONFIG_KEYS, VALUES), max_size=5).map(nest), VALUES)
CONFIG_FILES = st.one_of(DOCS.map(lambda d: yaml.safe_dump(d).encode()), st.binary(max_size=40),
                         st.text(max_size=40).map(str.encode))
OVERRIDE_KEYS = CONFIG_KEYS | st.sampled_from(["", ".seed", "seed.", "a..b", " seed", "SEED", "data.path.x"])
OVERRIDES = st.lists(st.one_of(st.tuples(OVERRIDE_KEYS, YAML_TEXT).map("=".join), OVERRIDE_KEYS, st.text(max_size=10)),
                     max_size=4)


@FUZZ
@given(data=CONFIG_FILES, use_file=st.booleans(), overrides=OVERRIDES)
def test_load_config_fuzz(tmp_path, data, use_file, overrides):
    path = tmp_path / "c.yaml"
    path.write_bytes(data)
    try:
        cfg = to_dict(load_config(str(path) if use_file else None, overrides))
    except ConfigError as exc:
        assert "\n" not in str(exc) and (not use_file or str(path) in str(exc) or "override" in str(exc)
                                          or "config key" in str(exc)), str(exc)
        return
    got = leaves(cfg)
    for key, default in DEFAULTS.items():
        assert same_type(got[key], default), f"{key} = {got[key]!r}, default {default!r}"


@pytest.mark.parametrize("text,overrides,message", [
    (b"- 1\n- 2\n", [], r"c.yaml: expected a mapping of config keys at the top level, got \[1, 2\]"),
    (b"seed: 1\n\xff\n", [], r"c.yaml: invalid YAML"),
    (b"data:\n  rho: {a: 1}\n", [], r"c.yaml: config key 'data.rho': expected a number, got a mapping"),
    (b"data:\n  dataset: [npz]\n", [], r"c.yaml: config key 'data.dataset': expected a string, got \['npz'\]"),
    (b"teacher:\n  batched: on\n", [], r"config key 'teacher.batched': expected a string, got True \(YAML reads on/off"),
    (b"student:\n  optim:\n    lr: .nan\n", [], r"config key 'student.optim.lr': expected a finite number"),
    (b"seed: 2.5\n", [], r"config key 'seed': expected a number \(an integer\), got 2.5"),
    (b"[" * 2000, [], r"c.yaml: invalid YAML \(nested too deeply\)"),
    (b"aug:\n  flip: 2\n", [], r"config key 'aug.flip': expected a boolean, got 2"),
    (b"aug:\n  crop_scale: [0.5]\n", [], r"config key 'aug.crop_scale': expected a list of 2 numbers"),
    (b"", ["seed=["], r"config key 'seed': cannot read '\['"),
    (b"", ["data=1", "data.path=x"], r"override 'data.path=x': an earlier override gives 'data' a value"),
    (b"", ["=1"], r"override '=1': '' is not a config key"),
    (b"", ["teacher.kinds=vanilla"], r"config key 'teacher.kinds': expected a list, got 'vanilla'"),
    (b"", ["data.dataset=imagenet_lt"], r"config key 'data.dataset': 'imagenet_lt': expected one of mnist-lt"),
    (b"", ["data.rho=0.5"], r"config key 'data.rho': 0.5 is less than 1"),
])
def test_config_errors_name_the_file_and_key(tmp_path, text, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(text)
    with pytest.raises(ConfigError, match=message):
        load_config(str(path), overrides)


def test_override_forms_that_work():
    cfg = load_config(None, ["seed=1e3", "teacher.optim.lr=1e-3", "data.path=2024", "teacher.kinds=[aug]",
                             "aug.flip=yes", "seed = 7"])
    assert cfg.seed == 7 and cfg.teacher.optim.lr == 1e-3 and cfg.data.path == "2024" and cfg.aug.flip is True
    assert cfg.teacher.kinds == ("aug",)
    with pytest.raises(ConfigError):
        load_config("/nonexistent/c.yaml")


# --- model files ---------------------------------------------------------------------------------------

def _blobs():
    from fastcbd.models import Student, Teacher

    torch.manual_seed(0)
    t = Teacher("small_cnn", 3, in_channels=1, width=2)
    s = Student("small_cnn", 3, proj_dim=4, in_channels=1, width=2)
    common = {"backbone": "small_cnn", "num_classes": 3, "in_channels": 1, "sigma": 20.0, "width": 2}
    return [{"format": "fastcbd.model/1", "arch": {"role": "teacher", **common}, "state_dict": t.state_dict(),
             "meta": {"name": "t"}},
            {"format": "fastcbd.model/1", "arch": {"role": "student", "proj_dim": 4, **common},
             "state_dict": s.state_dict(), "meta": {"method": "cbd"}}]


BLOBS = _blobs()
ARCH_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2, 5), st.sampled_from([2**40, 10**5000, 1.5, "x", "resnet18",
                        "resnet9999998", "resnet" + "9" * 5000, "lws", "tau_norm", [3], {}]))


@st.composite
def model_files(draw) -> bytes:
    blob = dict(draw(st.sampled_from(BLOBS)))
    arch, state, valid = dict(blob["arch"]), dict(blob["state_dict"]), blob["state_dict"]
    for _ in range(draw(st.integers(0, 2))):
        how = draw(st.sampled_from(["arch", "arch_drop", "tensor", "tensor_drop", "field", "field_drop", "blob"]))
        if how == "arch":
            arch[draw(st.sampled_from([*arch, "head", "proj_dim", "tau"]))] = draw(ARCH_VALUES)
        elif how == "arch_drop" and arch:
            arch.pop(draw(st.sampled_from(sorted(arch))))
        elif how == "tensor":
            key = draw(st.sampled_from(sorted(valid)))
            state[key] = draw(st.sampled_from([torch.zeros(3), valid[key].double(), 5, "w", valid[key].reshape(-1)]))
        elif how == "tensor_drop" and state:
            state.pop(draw(st.sampled_from(sorted(state))))
        elif how == "field":
            blob[draw(st.sampled_from(["format", "arch", "meta", "state_dict"]))] = draw(
                st.sampled_from([None, "fastcbd.model/0", 3, [1], {}, torch.zeros(2)]))
        elif how == "field_drop":
            blob.pop(draw(st.sampled_from(sorted(blob))))
        else:
            blob = draw(st.sampled_from([[1], torch.zeros(3), "x", None]))
            break
    if isinstance(blob, dict):
        blob.update({k: v for k, v in (("arch", arch), ("state_dict", state)) if isinstance(blob.get(k), dict)})
    buf = io.BytesIO()
    torch.save(blob, buf)
    data = bytearray(buf.getvalue())
    if draw(st.booleans()):  # corrupt bytes: torch's zip reader (CRC) usually refuses them
        for _ in range(draw(st.integers(1, 3))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
    return bytes(data[: draw(st.none() | st.integers(0, len(data)))])


@FUZZ
@given(data=model_files())
def test_load_model_fuzz(tmp_path, data):
    path = tmp_path / "model.pt"
    path.write_bytes(data)
    try:
        model, blob = load_model(str(path))
    except UserError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc), str(exc)
        return
    assert isinstance(model, torch.nn.Module) and not model.training
    assert isinstance(blob["arch"], dict) and isinstance(blob["meta"], dict) and "state_dict" not in blob


@pytest.mark.parametrize("edit,message", [
    (lambda b: b["arch"].pop("in_channels"), r"field 'arch.in_channels' must be an integer in \[1, 1048576\], got None"),
    (lambda b: b["arch"].update(num_classes=2**40), r"field 'arch.num_classes' must be an integer"),
    (lambda b: b["arch"].update(num_classes=5), r"field 'arch' says 5 classes, the classifier weights are \[\(3, 8\)\]"),
    (lambda b: b["arch"].update(backbone=True), r"field 'arch' needs role \(teacher or student\) and backbone"),
    (lambda b: b["arch"].update(backbone="resnet9999998"), r"'resnet9999998' is deeper than resnet1202"),
    (lambda b: b["arch"].update(backbone="vgg"),
     r"field 'arch' .* does not describe a fastcbd model \(\w+Error: model.backbone='vgg'"),
    (lambda b: b.update(meta=None), r"field 'meta' must be a dict, got NoneType"),
    (lambda b: b["state_dict"].update({"classifier.weight": torch.zeros(3, 7)}), r"weights do not match the architecture"),
])
def test_model_file_fields_are_named(tmp_path, edit, message):
    blob = {**BLOBS[0], "arch": dict(BLOBS[0]["arch"]), "state_dict": dict(BLOBS[0]["state_dict"])}
    edit(blob)
    torch.save(blob, tmp_path / "model.pt")
    with pytest.raises(BadInputError, match=message):
        load_model(str(tmp_path / "model.pt"))
    (tmp_path / "x.pt").write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(BadInputError, match=r"x.pt: not a readable fastcbd model file"):
        load_model(str(tmp_path / "x.pt"))
