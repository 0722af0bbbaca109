"""The teacher-feature cache (fastcbd.cache): stored views regenerate exactly, cached features are the live
teachers' features of those views (to fp16 rounding), a cache built otherwise is refused naming what differs,
a killed build resumes, and a student trained from a cache resumes bit-exactly after SIGTERM (in-memory
arrays through the CLI; image files through the torch loader at the loader level)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "train"))
from test_resume import _npz

from fastcbd.cache import CachedLoader, TeacherCache, build_cache, cache_key
from fastcbd.cache.store import allot_views, weights_hash
from fastcbd.data import load_npz
from fastcbd.data.augment import AugmentConfig, apply_crop, draw_crop
from fastcbd.errors import ConfigError
from fastcbd.models import Teacher
from fastcbd.train.checkpoint import load_model, save_model
from fastcbd.train.config import load_config
from fastcbd.train.stages import Context

TINY = ["model.width=4", "threads=1", "amp=none", "data.batch_size=16"]


def _ctx(data, *overrides) -> Context:
    cfg = load_config(None, ["data.dataset=npz", f"data.path={data}", *TINY, *overrides])
    return Context(cfg, load_npz(data), progress=False)


def _teachers(ctx, n=2):
    torch.manual_seed(0)
    out = []
    for _ in range(n):
        t = Teacher("small_cnn", ctx.splits.num_classes, ctx.in_channels, 20.0, 4).eval()
        out.append(ctx.place(t))
    return out


def _ids(teachers):
    return [{"path": f"t{i}.pt", "sha256": f"{i:016x}"} for i in range(len(teachers))]


@pytest.fixture
def built(tmp_path):
    data = _npz(tmp_path)
    ctx = _ctx(data)
    teachers = _teachers(ctx)
    cache = build_cache(ctx, teachers, _ids(teachers), 3, str(tmp_path / "cache"), seed=5, batch_size=7, chunk_rows=50)
    return ctx, teachers, cache


def test_params_regenerate_the_same_view_bit_identically():
    x = torch.rand(6, 3, 16, 16)
    for aug in (AugmentConfig(crop_scale=(0.3, 1.0), flip=True), AugmentConfig(pad=3, flip=True)):
        p = draw_crop(6, aug, torch.Generator().manual_seed(1))
        assert p.shape == (6, 5) and p.dtype == torch.float32
        assert torch.equal(p, draw_crop(6, aug, torch.Generator().manual_seed(1)))
        a, b = apply_crop(x, p, aug), apply_crop(x.clone(), p.clone(), aug)
        assert torch.equal(a, b) and not torch.equal(a, x)


def test_cached_features_are_the_live_teachers_on_the_stored_view(built):
    ctx, teachers, cache = built
    assert cache.complete and cache.meta["rows"] == 3 * len(ctx.splits.y_train)
    assert np.all(cache.done == 1) and len(cache.done) == -(-cache.meta["rows"] // 50)
    loader, smp = ctx.train_loader("balanced", "vanilla", seed=3)
    w = [weights_hash(t) for t in teachers]
    cached = CachedLoader.over(loader, cache, w)
    seen = {}
    pick = cached.rows
    cached.rows = lambda idx: seen.setdefault("rows", (idx, pick(idx)))[1]  # record the first batch's rows
    smp.set_epoch(0)
    (x, feats), y = next(iter(cached))
    assert len(feats) == 2 and [f.shape[1] for f in feats] == [t.out_features for t in teachers]
    with torch.inference_mode():
        live = [t.features(x) for t in teachers]
    for f, g in zip(feats, live):
        assert f.abs().max() > 0
        torch.testing.assert_close(f, g, rtol=2**-10, atol=1e-5)  # fp16 storage: 11 significant bits
    # the row's stored parameters (params.npy) cut the same pixels again
    idx, rows = seen["rows"]
    assert torch.equal(y, torch.from_numpy(ctx.splits.y_train)[idx])
    stored = torch.from_numpy(np.array(cache.params))[rows]
    assert torch.equal(cached.view(idx, stored), x)
    assert ((rows >= torch.from_numpy(cache.offsets)[idx]) & (rows < torch.from_numpy(cache.offsets)[idx + 1])).all()
    # a student of the second teacher alone (CBD beside CBD_ENS) is served from the same cache
    second = CachedLoader.over(loader, cache, w[1:])
    assert second.dims == [teachers[1].out_features]


def test_a_cache_built_otherwise_is_refused_naming_what_differs(built, tmp_path):
    ctx, teachers, cache = built
    ids = _ids(teachers)
    with pytest.raises(ConfigError, match=r"views: cache 3, this run 4"):
        build_cache(ctx, teachers, ids, 4, cache.folder)
    other = _ctx(ctx.cfg.data.path, "aug.crop_scale=[0.2, 1.0]")
    with pytest.raises(ConfigError, match=r"aug\.crop_scale: cache \[0\.6, 1\.0\], this run \[0\.2, 1\.0\]"):
        cache.check(cache_key(other, [weights_hash(t) for t in teachers], 3, "uniform"))
    stranger = Teacher("small_cnn", ctx.splits.num_classes, ctx.in_channels, 20.0, 4)
    with pytest.raises(ConfigError, match=r"teachers: weights [0-9a-f]{12} not in the cache"):
        cache.check(cache_key(ctx, [weights_hash(stranger)], 3, "uniform"))
    with pytest.raises(ConfigError, match=r"amp: cache 'none', this run 'bf16'"):
        cache.check(cache_key(_ctx(ctx.cfg.data.path, "amp=bf16"), [weights_hash(teachers[0])], 3, "uniform"))
    cache.check(cache_key(ctx, [weights_hash(teachers[1])], 3, "uniform"))  # a subset of its teachers: fine
    assert build_cache(ctx, teachers, ids, 3, cache.folder).meta == cache.meta  # the same key: reused


def test_balanced_allotment_follows_class_balanced_draws():
    y = np.array([0] * 40 + [1] * 10 + [2] * 2)
    v = allot_views(y, 4, 8, "balanced")
    assert abs(v.sum() - 8 * len(y)) <= len(y) / 2 and v.min() >= 1  # per-class rounding: within 1/2 an image
    per_class = [v[y == c][0] for c in range(3)]
    assert per_class[2] > per_class[1] > per_class[0]  # rarer class, more views per image
    expected = [8 * len(y) / (3 * n) for n in (40, 10, 2)]
    assert all(abs(a - b) <= 0.5 for a, b in zip(per_class, expected))
    assert np.all(allot_views(y, 4, 5, "uniform") == 5)
    with pytest.raises(ConfigError, match="cache_allot"):
        allot_views(y, 4, 5, "sqrt")


def _jpeg_ctx(tmp_path, *overrides):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "data"))
    from data_files import write_jpegs, write_list

    from fastcbd.train.pipeline import load_data

    if not (tmp_path / "train.txt").exists():  # odd sizes: the boxes are in each file's own pixels
        write_list(tmp_path / "train.txt", write_jpegs(tmp_path, [6, 3, 2], "train", size=(21, 17)))
        write_list(tmp_path / "test.txt", write_jpegs(tmp_path, [1, 1, 1], "val", size=(21, 17)))
    cfg = load_config(None, ["data.dataset=imagenet-lt", f"data.root={tmp_path}", "data.train_list=train.txt",
                             "data.test_list=test.txt", "data.image_size=12", "data.loader=torch", "data.workers=2",
                             "aug.flip=true", *TINY, "data.batch_size=4", *overrides])
    return Context(cfg, load_data(cfg), progress=False)


def test_image_files_cache_cuts_stored_boxes_and_resumes_exactly(tmp_path):
    from fastcbd.cache import cached_loader
    from fastcbd.cache.files import StoredViews, view_batches
    from fastcbd.data.decode import load_rgb

    ctx = _jpeg_ctx(tmp_path)
    teachers = _teachers(ctx)
    cache = build_cache(ctx, teachers, _ids(teachers), 3, str(tmp_path / "c"), seed=4, batch_size=5, chunk_rows=8)
    boxes = np.array(cache.params).astype(np.int64)
    assert cache.complete and len(boxes) == 33 and (boxes[:, 2:4] > 0).all()
    assert (boxes[:, 0] + boxes[:, 2] <= 21).all() and (boxes[:, 1] + boxes[:, 3] <= 17).all()  # in the image
    assert set(boxes[:, 4]) == {0, 1} and len({tuple(b) for b in boxes}) > 25  # flips both ways, varied crops

    def batches(n, state=None):
        loader, smp = ctx.train_loader("balanced", "vanilla", seed=3)
        loader = cached_loader(loader, cache, [weights_hash(t) for t in teachers])
        smp.set_epoch(1)
        if state is not None:
            smp.load_state_dict(state["sampler"])
            loader.load_state_dict(state["loader"])
        out = []
        for (x, feats), y in loader:
            out.append((x, feats, y))
            if len(out) == n:
                return out, {"sampler": smp.state_dict(), "loader": loader.state_dict()}
        return out, None

    whole, _ = batches(3)
    first, state = batches(1)
    rest, _ = batches(2, state)
    for (a, fa, ya), (b, fb, yb) in zip(whole, first + rest):  # stopped after a batch, resumed: the same views
        assert torch.equal(a, b) and torch.equal(ya, yb) and all(torch.equal(p, q) for p, q in zip(fa, fb))
    x, feats, y = whole[0]
    with torch.inference_mode():
        for f, t in zip(feats, teachers):
            torch.testing.assert_close(f, t.features(x), rtol=2**-10, atol=1e-5)
    # a stored box, cut again from the file, gives the batch's pixels
    loader, _ = ctx.train_loader("balanced", "vanilla", seed=3)
    row = 7
    image = int(np.searchsorted(cache.offsets, row, side="right") - 1)
    crop = loader.dataset.cut(load_rgb(loader.dataset.files.paths[image]), boxes[row])
    x_row = next(iter(view_batches(loader, StoredViews(loader.dataset, boxes), [[(image, row)]], 0)))[0]
    assert torch.equal(x_row, loader._normalize(crop[None].float()))


def test_loaders_the_cache_cannot_serve_are_refused_with_the_reason(tmp_path):
    ctx = _jpeg_ctx(tmp_path, "data.skip_bad=true")
    teachers = _teachers(ctx, 1)
    with pytest.raises(ConfigError, match=r"data.skip_bad=true"):
        build_cache(ctx, teachers, _ids(teachers), 2, str(tmp_path / "c"))
    arrays = _ctx(_npz(tmp_path), "data.loader=torch")
    with pytest.raises(ConfigError, match=r"gives TorchLoader here: set data.loader=device for in-memory arrays"):
        build_cache(arrays, teachers, _ids(teachers), 2, str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()


def _cli(*args):
    return [sys.executable, "-m", "fastcbd", *args]


def _save_teachers(tmp_path, data):
    ctx = _ctx(data)
    paths = []
    for i, t in enumerate(_teachers(ctx)):
        paths.append(str(tmp_path / f"t{i}" / "model.pt"))
        save_model(paths[-1], t, ctx.arch("teacher"), {}, ctx.info())
    return paths


def _built_by_cli(tmp_path, out: str, *args) -> list[str]:
    """Two saved teachers on the test npz, `fastcbd cache-teachers --out tmp_path/out args` run; returns the
    command's arguments after --out."""
    data = _npz(tmp_path)
    common = ["--data", data, "--teachers", *_save_teachers(tmp_path, data), *args, *TINY]
    made = subprocess.run(_cli("cache-teachers", "--out", str(tmp_path / out), *common), capture_output=True,
                          text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    return common


def test_a_killed_build_resumes_to_the_same_cache(tmp_path):
    common = _built_by_cli(tmp_path, "a", "--views", "4", "--chunk-rows", "32")
    out = tmp_path / "b"
    env = dict(os.environ, FASTCBD_STEP_DELAY="0.3")
    proc = subprocess.Popen(_cli("cache-teachers", "--out", str(out), *common), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not (out / "done.npy").exists() or np.load(out / "done.npy").sum() < 2:
        assert proc.poll() is None and time.time() - t0 < 120, "the build ended or stalled before 2 chunks"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done = np.load(out / "done.npy")
    assert 2 <= done.sum() < len(done) and not json.loads((out / "cache.json").read_text())["complete"]
    with pytest.raises(ConfigError, match="half-built"):
        TeacherCache(str(out)).check(TeacherCache(str(tmp_path / "a")).key)
    again = subprocess.run(_cli("cache-teachers", "--out", str(out), *common), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "half-built" in again.stderr, again.stderr[-3000:]
    a, b = TeacherCache(str(tmp_path / "a")), TeacherCache(str(out))
    assert b.complete and np.array_equal(a.params, b.params)
    assert np.array_equal(np.asarray(a.features).view(np.uint16), np.asarray(b.features).view(np.uint16))


def test_a_student_on_a_cache_resumes_bit_exactly_and_matches_the_cli(tmp_path):
    data = _built_by_cli(tmp_path, "cache", "--views", "3")[1]
    cache = str(tmp_path / "cache")
    run = ["--data", data, "--teacher-cache", cache, *TINY, "student.optim.epochs=4", "checkpoint.every=1",
           "checkpoint.keep=2"]
    straight = subprocess.run(_cli("train-student", "--out", str(tmp_path / "a"), *run), capture_output=True,
                              text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "b"
    env = dict(os.environ, FASTCBD_STEP_DELAY="0.2")
    proc = subprocess.Popen(_cli("train-student", "--out", str(out), *run), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (out / "checkpoints" / "step_00000006.pt").exists():
        assert proc.poll() is None and time.time() - t0 < 120, "no checkpoint of step 6"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    resumed = subprocess.run(_cli("train-student", "--out", str(out), *run), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-3000:]
    a, blob = load_model(str(tmp_path / "a" / "model.pt"))
    b, _ = load_model(str(out / "model.pt"))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert blob["arch"]["proj_dim"] == 2 * 16 and len(blob["meta"]["teachers"]) == 2  # both cache teachers
    # --teacher-cache serves the views it was built with (3, uniform; the default config says 16, balanced);
    # a cache of another augmentation is refused by train-student, one line, exit 2
    assert blob["meta"]["teachers"][0]["weights"] and "views: cache" not in straight.stderr
    bad = subprocess.run(_cli("train-student", "--out", str(tmp_path / "c"), *run, "aug.crop_scale=[0.2,1.0]"),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "aug.crop_scale: cache [0.6, 1.0], this run [0.2, 1.0]" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.skipif(not torch.distributed.is_available() or not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torch.distributed / torchrun not available")
def test_torchrun_ranks_build_their_shares_of_one_cache(tmp_path):
    common = _built_by_cli(tmp_path, "one", "--views", "4", "--chunk-rows", "40")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "fastcbd", "cache-teachers", "--out",
                          str(tmp_path / "two"), *common], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert two.returncode == 0, two.stderr[-4000:]
    a, b = TeacherCache(str(tmp_path / "one")), TeacherCache(str(tmp_path / "two"))
    assert b.complete and len(b.done) == 7 and np.array_equal(a.params, b.params)
    assert np.array_equal(np.asarray(a.features).view(np.uint16), np.asarray(b.features).view(np.uint16))


def test_the_demo_pipeline_trains_both_students_from_one_cache(tmp_path):
    from fastcbd.train.pipeline import run_cbd

    data = _npz(tmp_path)
    cfg = load_config(None, ["data.dataset=npz", f"data.path={data}", *TINY, "teacher.optim.epochs=1",
                             "student.optim.epochs=1", "crt.epochs=1", "teacher.kinds=[vanilla,aug]",
                             "student.teacher_cache=2", "student.cache_allot=balanced", "baselines.methods=[]"])
    r = run_cbd(cfg, str(tmp_path / "run"), progress=False)
    assert r["seconds"]["teacher_cache"] > 0 and {"cbd", "cbd_ens"} <= set(r["methods"])
    cache = TeacherCache(str(tmp_path / "run" / "teacher_cache"))
    assert cache.complete and cache.key["allot"] == "balanced" and len(cache.meta["teachers"]) == 2
    counts = np.diff(cache.offsets)
    y = np.load(data)["y_train"]
    assert counts[y == 2].min() > counts[y == 0].max()  # the rarest class's images have the most views
    cbd, blob = load_model(str(tmp_path / "run" / "cbd" / "model.pt"))
    ens, blob_ens = load_model(str(tmp_path / "run" / "cbd_ens" / "model.pt"))
    assert blob["arch"]["proj_dim"] == 16 and blob_ens["arch"]["proj_dim"] == 32  # CBD: the first teacher's columns
    assert [t["weights"] for t in blob_ens["meta"]["teachers"]] == cache.key["teachers"]
