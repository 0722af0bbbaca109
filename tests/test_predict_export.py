"""`fastcbd predict` and `fastcbd export` on a model trained end to end with timm backbones (train-teachers
with timm:test_resnet, train-student with a one-block timm:test_vit) on a tiny 28 px gray .npz with class
names: the evaluation transform, bad inputs named and skipped, and each export format loaded back."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastcbd.cli import main
from fastcbd.train.checkpoint import load_model, save_model

pytest.importorskip("timm", reason="pip install 'fastcbd[timm]'")
NAMES = ["circle", "square", "cross"]


def fastcbd(*args):
    proc = subprocess.run([sys.executable, "-m", "fastcbd", *args], capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, f"fastcbd {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(root, student model.pt, the .npz): the e2e run, a few steps of each stage."""
    root = tmp_path_factory.mktemp("timm_e2e")
    rng = np.random.default_rng(0)
    y = np.array([0] * 30 + [1] * 10 + [2] * 4)
    data = str(root / "shapes.npz")
    np.savez(data, x_train=rng.integers(0, 255, (len(y), 28, 28, 1), dtype=np.uint8), y_train=y,
             x_test=rng.integers(0, 255, (9, 28, 28, 1), dtype=np.uint8), y_test=np.arange(9) % 3,
             class_names=np.array(NAMES))
    common = ["data.batch_size=16", "threads=1", "teacher.optim.epochs=1", "student.optim.epochs=1"]
    fastcbd("train-teachers", "--data", data, "--out", str(root / "t"), "model.backbone=timm:test_resnet",
            "teacher.kinds=[vanilla]", *common)
    fastcbd("train-student", "--data", data, "--teachers", str(root / "t"), "--out", str(root / "s"),
            "model.backbone=timm:test_vit", "model.timm_kwargs={patch_size: 7, depth: 1}", *common)
    return root, str(root / "s" / "model.pt"), data


def test_model_file_records_what_predict_and_export_need(trained):
    _, model, _ = trained
    blob = torch.load(model, map_location="cpu", weights_only=True)
    assert blob["arch"]["backbone"] == "timm:test_vit" and blob["arch"]["image_size"] == [28, 28]
    assert blob["arch"]["timm_kwargs"] == {"patch_size": 7, "depth": 1} and blob["arch"]["proj_dim"] == 96
    assert blob["input"]["channels"] == 1 and blob["input"]["size"] == [28, 28] and blob["input"]["resize"] is None
    assert len(blob["input"]["mean"]) == len(blob["input"]["std"]) == 1 and blob["class_names"] == NAMES


def _images(folder, x):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    Image.fromarray(x[0, :, :, 0]).save(folder / "a.png")
    Image.fromarray(np.repeat(x[1], 3, axis=2)).save(folder / "b.jpg", quality=100)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("ignored: not an image")


def test_predict_folder_json_matches_the_evaluation_transform(trained, tmp_path, capsys):
    _, model, data = trained
    x = np.load(data)["x_test"]
    _images(tmp_path / "imgs", x)
    np.savez(tmp_path / "imgs" / "more.npz", x_test=x[:3])
    assert main(["predict", "--model", model, str(tmp_path / "imgs"), "--topk", "2", "--json"]) == 0
    out, err = capsys.readouterr()
    r = json.loads(out)
    files = [os.path.basename(p["file"]) for p in r["predictions"]]
    assert files == ["a.png", "b.jpg", "more.npz:x_test[0]", "more.npz:x_test[1]", "more.npz:x_test[2]"], files
    assert [os.path.basename(b["file"]) for b in r["unreadable"]] == ["broken.png"] and "broken.png" in err
    net, blob = load_model(model)
    info = blob["input"]
    xt = (torch.from_numpy(x[:3]).permute(0, 3, 1, 2).float() / 255 - info["mean"][0]) / info["std"][0]
    with torch.no_grad():
        want = torch.softmax(net(xt), 1)
    for i, p in enumerate([r["predictions"][0]] + r["predictions"][2:]):
        row = want[0 if i == 0 else i - 1]
        top = row.topk(2)
        assert [t["class"] for t in p["top"]] == top.indices.tolist(), (p, row)
        assert [t["name"] for t in p["top"]] == [NAMES[c] for c in top.indices.tolist()]
        np.testing.assert_allclose([t["prob"] for t in p["top"]], top.values.numpy(), atol=1e-5)
    jpg = torch.tensor([t["prob"] for t in r["predictions"][1]["top"]])
    assert jpg.sum() <= 1 + 1e-5 and (jpg[:-1] >= jpg[1:]).all()


def test_predict_text_and_an_unreadable_only_input(trained, tmp_path, capsys):
    _, model, _ = trained
    _images(tmp_path / "imgs", np.zeros((2, 28, 28, 1), np.uint8))
    assert main(["predict", "--model", model, str(tmp_path / "imgs" / "a.png"), "--topk", "9"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(tmp_path / "imgs" / "a.png")) and all(n in line for n in NAMES), line
    assert main(["predict", "--model", model, str(tmp_path / "imgs" / "broken.png")]) == 2
    assert "none of the 1 input file(s) could be read" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["safetensors", "pt2", "onnx"])
def test_export_round_trip(trained, tmp_path, capsys, fmt):
    from fastcbd.export import load_exported

    _, model, _ = trained
    out = str(tmp_path / f"student.{fmt}")
    assert main(["export", "--model", model, "--format", fmt, "--out", out]) == 0
    msg = capsys.readouterr().out
    diff = float(msg.rsplit("max abs logit difference ", 1)[1])
    assert diff < 1e-4, msg
    assert os.listdir(tmp_path) == [f"student.{fmt}"], "one self-contained file (no ONNX external data)"
    net, _ = load_model(model)
    x = torch.randn(5, 1, 28, 28)
    if fmt == "pt2":  # the plain torch.export API, at a batch size that was not exported
        run, meta = torch.export.load(out).module(), load_exported(out)[1]
    else:
        run, meta = load_exported(out)
    with torch.no_grad():
        got, want = run(x), net(x)
    assert (got - want).abs().max() < 1e-4, (got - want).abs().max()
    assert meta["arch"]["backbone"] == "timm:test_vit" and meta["class_names"] == NAMES


def test_export_format_not_installed_says_what_to_install(trained, tmp_path, monkeypatch, capsys):
    from fastcbd.export import export_model

    _, model, _ = trained
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ImportError, match=r"--format onnx needs the onnx, onnxscript, onnxruntime.*fastcbd\[export\]"):
        export_model(model, "onnx", str(tmp_path / "m.onnx"))
    assert main(["export", "--model", model, "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "onnxscript is not installed" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()


def test_files_without_the_new_records_still_load(tmp_path, capsys):
    """A model file as written before this change (no image_size, input or class names) loads; predict
    and export say what they miss."""
    from fastcbd.models import Teacher

    path = str(tmp_path / "old.pt")
    save_model(path, Teacher("small_cnn", 3, 1, width=4),
               {"role": "teacher", "backbone": "small_cnn", "num_classes": 3, "in_channels": 1, "sigma": 20.0,
                "width": 4})
    model, blob = load_model(path)
    assert model(torch.zeros(2, 1, 12, 12)).shape == (2, 3) and "input" not in blob
    for args in (["predict", "--model", path, path], ["export", "--model", path, "--format", "pt2", "--out",
                                                      str(tmp_path / "x.pt2")]):
        assert main(args) == 2
        assert "written before model files recorded their input" in capsys.readouterr().err


def test_unknown_timm_name_from_the_command_line(trained, tmp_path, capsys):
    _, _, data = trained
    args = ["train-teachers", "--data", data, "--out", str(tmp_path / "o"), "model.backbone=timm:vit_smal_patch16_224"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "timm:vit_smal_patch16_224: timm" in err and "did you mean vit_small_patch16_224" in err, err


def test_fold_matches_each_head():
    """The exported network (cosine classifier folded to sigma W/||W||) gives the model's logits for a
    student, a teacher, and the LWS, tau-norm and post-hoc heads around a teacher."""
    from fastcbd.export import fold
    from fastcbd.models import Student, Teacher
    from fastcbd.models.heads import LWS, LinearHead, PostHocAdjusted

    torch.manual_seed(0)
    teacher = Teacher("small_cnn", 5, 1, width=4).eval()
    lws = LWS(teacher, 5)
    with torch.no_grad():
        lws.scale.uniform_(0.5, 2)
    models = {"student": Student("small_cnn", 5, 24, 1, width=4), "teacher": teacher, "lws": lws,
              "tau_norm": LinearHead(teacher.backbone, 5), "posthoc": PostHocAdjusted(teacher, [50, 20, 9, 3, 1], 0.7)}
    x = torch.randn(3, 1, 12, 12)
    for name, model in models.items():
        with torch.no_grad():
            want, got = model.eval()(x), fold(model)[0](x)
        assert (got - want).abs().max() < 1e-5, (name, (got - want).abs().max())
