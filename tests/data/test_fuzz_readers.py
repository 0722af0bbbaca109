"""Fuzzing the data readers (hypothesis): list files, COCO JSON, CIFAR pickle batches and .npz files.

Whatever the bytes, a reader either returns a well-formed split or raises the documented user error
(fastcbd.errors.UserError, BadInputError for data files) with a one-line message naming the file; nothing
else escapes. A few hundred generated inputs per reader here; benchmarks/fuzz_readers.py runs 10,000 each.
"""
import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fastcbd.data.arrays import load_npz
from fastcbd.data.cifar import read_batches
from fastcbd.data.files import MAX_CLASSES
from fastcbd.data.inat import read_coco
from fastcbd.data.listfile import read_list
from fastcbd.errors import BadInputError, UserError

FUZZ = settings(max_examples=250, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.just(10**400), st.floats(),
                         st.text(max_size=6))
JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                             max_size=3), max_leaves=6)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A folder with six (undecoded) image files img/c<k>/<i>.jpg; the inputs are written to root/input."""
    root = tmp_path_factory.mktemp("fuzz")
    for i in range(6):
        (root / "img" / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / "img" / f"c{i % 3}" / f"{i}.jpg").write_bytes(b"\xff\xd8\xff\xd9")
    return root


RELS = [f"img/c{i % 3}/{i}.jpg" for i in range(6)]


def one_line(exc: Exception, path) -> None:
    """The documented error: one line (a list file's own text stays inside repr quotes) naming the file."""
    msg = str(exc)
    assert str(path) in msg and "\n" not in msg and "Traceback" not in msg, repr(msg)


def well_formed(split, paths_exist=True) -> None:
    y = split.labels
    assert y.dtype == np.int64 and y.ndim == 1 and len(y) == len(split.paths) > 0, (y.dtype, y.shape)
    assert 0 <= y.min() and y.max() < split.num_classes <= MAX_CLASSES, (y.min(), y.max(), split.num_classes)
    assert not paths_exist or all(os.path.isfile(p) for p in split.paths)


# --- list files ----------------------------------------------------------------------------------------

LABELS = st.one_of(st.integers(-(10**25), 10**25).map(str), st.text(max_size=5),
                   st.sampled_from(["\u0663", "\uff11", "1_0", "+2", "0x1", "1e3", "1.0", "-0", "2\u00a0", "99999999999999999999",
                                    "9" * 5000]))
LINES = st.one_of(st.tuples(st.sampled_from(RELS) | st.text(max_size=10), st.sampled_from([" ", "\t", "  "]), LABELS)
                  .map("".join), st.sampled_from(RELS), st.text(max_size=20), st.just(""))
LIST_FILES = st.one_of(
    st.tuples(st.lists(LINES, max_size=8), st.sampled_from(["\n", "\r\n", "\r"]),
              st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "utf-16", "latin-1"]))
    .map(lambda t: t[1].join(t[0]).encode(t[2], errors="replace")),
    st.binary(max_size=80))


@FUZZ
@given(data=LIST_FILES, num_classes=st.sampled_from([0, 0, 3, 7]), skip_bad=st.booleans())
def test_read_list_fuzz(root, data, num_classes, skip_bad):
    path = root / "input.txt"
    path.write_bytes(data)
    try:
        split = read_list(str(path), str(root), num_classes, train=num_classes == 0, skip_bad=skip_bad)
    except UserError as exc:
        one_line(exc, path)
        return
    well_formed(split)


@pytest.mark.parametrize("data,message", [
    (b"img/c0/0.jpg 0\nimg/c1/1.jpg \xff1\n", r"input.txt:2: not UTF-8 text \(byte 0xff at column 14\)"),
    (b"img/c0/0.jpg 99999999999999999999\n", r"input.txt:1: label 99999999999999999999 is outside \[0, C\)"),
    (b"img/c0/0.jpg " + b"9" * 5000 + b"\n", r"input.txt:1: label 9{40} is outside \[0, C\)"),  # int() refuses it
    (b"img/c0/0.jpg \xd9\xa3\n", "input.txt:1: label '\u0663' is not an integer"),  # int() would take it
    (b"img/c0/0.jpg 1_0\n", r"input.txt:1: label '1_0' is not an integer"),
    (b"img/c0\x00/0.jpg 0\n", r"input.txt:1: the path .* has a NUL byte"),
    (b"", r"input.txt: empty list file"),
    (b"\n  \n", r"input.txt: empty list file"),
    (b"0\n", r"input.txt:1: expected 'relative/path label', got '0'"),
])
def test_read_list_known_escapes_are_named(root, data, message):
    """The inputs the first fuzzing found (non-UTF-8 text, a 20-digit label) and their kin."""
    (root / "input.txt").write_bytes(data)
    with pytest.raises(BadInputError, match=message):
        read_list(str(root / "input.txt"), str(root))


def test_read_list_many_empty_classes_is_one_item(root, caplog):
    """A typo'd label (C = 100000 inferred): one message for the empty classes, not 99,999 of them."""
    (root / "input.txt").write_text("img/c0/0.jpg 0\nimg/c1/1.jpg 99999\n")
    with pytest.raises(BadInputError, match=r"99998 classes have no image: 1, 2, 3"):
        read_list(str(root / "input.txt"), str(root))
    split = read_list(str(root / "input.txt"), str(root), skip_bad=True)
    assert split.num_classes == 100000 and len(split.skipped) == 1


# --- COCO JSON -----------------------------------------------------------------------------------------

IDS = st.one_of(st.integers(0, 4), st.integers(-(2**70), 2**70), JSON)
IMAGES = st.lists(st.one_of(st.fixed_dictionaries({"id": IDS, "file_name": st.sampled_from(RELS) | JSON}), JSON),
                  max_size=5)
ANNOTATIONS = st.lists(st.one_of(st.fixed_dictionaries({"image_id": IDS, "category_id": IDS}), JSON), max_size=5)
CATEGORIES = st.one_of(st.lists(st.one_of(st.fixed_dictionaries({"id": IDS}), JSON), max_size=4), JSON)
DOCS = st.one_of(st.fixed_dictionaries({"images": IMAGES | JSON, "annotations": ANNOTATIONS | JSON},
                                       optional={"categories": CATEGORIES}), JSON)
COCO_FILES = st.one_of(
    st.tuples(DOCS, st.sampled_from(["utf-8", "utf-8", "utf-16", "utf-32"])).map(lambda t: json.dumps(t[0]).encode(t[1])),
    st.binary(max_size=60), st.just(b"[" * 100_000), st.just(b'{"images": [{"id": ' + b"9" * 5000 + b"}]}"))


@FUZZ
@given(data=COCO_FILES, train=st.booleans(), skip_bad=st.booleans())
def test_read_coco_fuzz(root, data, train, skip_bad):
    path = root / "input.json"
    path.write_bytes(data)
    try:
        split, cats = read_coco(str(path), str(root), None if train else {0: 0, 1: 1, 2: 2}, train=train,
                                skip_bad=skip_bad)
    except UserError as exc:
        one_line(exc, path)
        return
    well_formed(split)
    assert len(cats) == split.num_classes


@pytest.mark.parametrize("edit,message", [
    ({"images": [{"id": 1, "file_name": {"a": 1}}]}, r"images\[0\]: 'file_name' must be a non-empty path, got an object"),
    ({"images": [{"id": 1, "file_name": 7}]}, r"images\[0\]: 'file_name' must be a non-empty path, got 7"),
    ({"images": [{"id": [1], "file_name": "a.jpg"}]}, r"images\[0\]: 'id' must be an integer, got a list"),
    ({"annotations": [{"image_id": "100", "category_id": 0}]}, r"annotations\[0\]: 'image_id' must be an integer"),
    ({"categories": [{"id": 0}, {"id": 0}]}, r"categories\[1\]: id 0 appears twice"),
    ({"categories": [{"id": 1.5}]}, r"categories\[0\]: needs an integer 'id', got 1.5"),
    ({"categories": {"id": 0}}, r"'categories' must be a list, got an object"),
])
def test_read_coco_wrong_types_name_the_field(root, edit, message):
    doc = {"images": [{"id": 100 + i, "file_name": r} for i, r in enumerate(RELS)],
           "annotations": [{"image_id": 100 + i, "category_id": i % 3} for i in range(6)],
           "categories": [{"id": c} for c in range(3)], **edit}
    (root / "input.json").write_text(json.dumps(doc))
    with pytest.raises(BadInputError, match=message):
        read_coco(str(root / "input.json"), str(root))


def test_read_coco_not_utf8_and_too_deep(root):
    (root / "input.json").write_bytes(b'{"images": "\xff"}')
    with pytest.raises(BadInputError, match=r"input.json: not UTF-8 text \(byte 0xff at offset 12\)"):
        read_coco(str(root / "input.json"), str(root))
    (root / "input.json").write_bytes(b"[" * 100_000)
    with pytest.raises(BadInputError, match=r"input.json: (unreadable|invalid) JSON"):
        read_coco(str(root / "input.json"), str(root))


# --- CIFAR pickle batches ------------------------------------------------------------------------------

N = 10
DATA = st.one_of(
    st.builds(np.zeros, st.sampled_from([(N, 3072), (N, 3072), (N, 3071), (N,), (0, 3072), (N, 32, 32, 3), ()]),
              st.sampled_from([np.uint8, np.uint8, np.int64, np.float32, bool, object])),
    JSON, st.binary(max_size=8))
LABEL_LISTS = st.one_of(st.permutations(list(range(N))).map(list),
                        st.lists(st.one_of(st.integers(-2, 12), st.integers(-(2**70), 2**70), st.just(10**5000),
                                           JSON_SCALARS), max_size=N + 1))
LABEL_VALUES = st.one_of(LABEL_LISTS, LABEL_LISTS.map(tuple),
                         st.builds(np.ndarray.astype, hnp.arrays(np.int64, st.sampled_from([N, (N, 1)]),
                                                                 elements=st.integers(-1, 12)),
                                   st.sampled_from([np.int64, np.uint64, np.int8, np.float64, bool])), JSON)
BATCHES = st.one_of(st.fixed_dictionaries({}, optional={b"data": DATA, b"labels": LABEL_VALUES, "data": DATA,
                                                        "labels": LABEL_VALUES, b"\xff": st.just(1)}), JSON)


def _pickle(batch, protocol: int) -> bytes:
    try:
        return pickle.dumps(batch, protocol=protocol)
    except (pickle.PicklingError, ValueError, TypeError):
        return b"not a pickle"


CIFAR_FILES = st.one_of(st.tuples(BATCHES, st.integers(0, 5)).map(lambda t: _pickle(*t)), st.binary(max_size=60))


@FUZZ
@given(data=CIFAR_FILES, cut=st.none() | st.integers(0, 400))
def test_cifar_batch_fuzz(root, data, cut):
    path = root / "data_batch_1"
    path.write_bytes(data if cut is None else data[:cut])
    try:
        x, y = read_batches(str(root), ["data_batch_1"], "labels", 10)
    except UserError as exc:
        one_line(exc, path)
        return
    assert x.dtype == np.uint8 and x.shape == (len(y), 32, 32, 3) and y.dtype == np.int64
    assert sorted(y.tolist()) == list(range(10))


class RunsAShellCommand:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_cifar_batch_never_runs_what_a_pickle_names(root, monkeypatch):
    """pickle.load would run os.system; the batch unpickler refuses every callable but numpy's reconstructors."""
    monkeypatch.chdir(root)
    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": RunsAShellCommand(), b"labels": list(range(10))}))
    with pytest.raises(BadInputError, match=r"data_batch_1: not a readable CIFAR pickle batch .* names posix.system"):
        read_batches(str(root), ["data_batch_1"], "labels", 10)
    assert not (root / "pwned").exists()


def test_cifar_batch_field_errors(root):
    path = root / "data_batch_1"
    x = np.zeros((N, 3072), np.uint8)
    for batch, message in [
        ({b"data": x, b"labels": [[0]] * N}, r"field 'labels'\[0\] must be an integer label, got list"),
        ({b"data": x, b"labels": [2**70] * N}, r"field 'labels'\[0\] = 1180591620717411303424 is outside \[0, 10\)"),
        ({b"data": x.astype(np.float32), b"labels": list(range(N))},
         r"field 'data' must be an N x 3072 uint8 array, got a float32 array of shape \(10, 3072\)"),
        ({b"data": x[:, :100], b"labels": list(range(N))}, r"got a uint8 array of shape \(10, 100\)"),
        ({b"data": x, b"labels": list(range(N - 1))}, r"field 'labels' has 9 labels for 10 images"),
        ({b"data": x, b"labels": [0] * N}, r"no image of class\(es\) \[1, 2, 3, 4, 5, 6, 7, 8, 9\]"),
        ({b"data": x, b"\xfflabels": list(range(N))}, "no 'labels' field \\(has 'data', '\ufffdlabels'\\)"),
        ([x], r"expected a dict with 'data' and 'labels', got list"),
    ]:
        path.write_bytes(pickle.dumps(batch, protocol=2))
        with pytest.raises(BadInputError, match=message):
            read_batches(str(root), ["data_batch_1"], "labels", 10)


# --- .npz ----------------------------------------------------------------------------------------------

IMAGE_ARRAYS = st.builds(np.zeros, st.sampled_from([(6, 8, 8), (6, 8, 8, 3), (6, 8), (6,), (0, 8, 8), (6, 0, 8),
                                                    (6, 8, 8, 3, 1), ()]),
                         st.sampled_from([np.uint8, np.uint8, np.int16, np.float32, bool, ">u2"]))
LABEL_ARRAYS = st.builds(np.ndarray.astype, hnp.arrays(np.int64, st.sampled_from([6, 6, 5, (6, 1), ()]),
                                                       elements=st.integers(0, 3) | st.just(-1)),
                         st.sampled_from([np.int64, np.int32, np.uint64, np.int8, np.float32, bool]))
NPZ_ARRAYS = st.fixed_dictionaries({}, optional={"x_train": IMAGE_ARRAYS, "y_train": LABEL_ARRAYS,
                                                 "x_test": IMAGE_ARRAYS, "y_test": LABEL_ARRAYS,
                                                 "extra": st.just(np.arange(3, dtype=object))})


def _inflate_shape(npy: bytes) -> bytes:
    """A .npy whose header's first dimension is x 10^10, written into the header's padding."""
    i = npy.find(b"'shape': (") + len(b"'shape': (")
    j = npy.find(b"}", i) + 1
    return npy[:i] + b"9999999999" + npy[i:j] + npy[j + 10 :] if npy[j : j + 10] == b" " * 10 else npy


def _npz(arrays, compressed: bool, inflate: bool = False) -> bytes:
    """np.savez's layout (a zip of <key>.npy); inflate: the first array's header claims a huge shape."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED) as z:
        for i, (key, value) in enumerate(arrays.items()):
            npy = io.BytesIO()
            np.save(npy, value, allow_pickle=True)
            z.writestr(key + ".npy", _inflate_shape(npy.getvalue()) if inflate and i == 0 else npy.getvalue())
    return buf.getvalue()


@FUZZ
@given(arrays=NPZ_ARRAYS, compressed=st.booleans(), edit=st.data())
def test_npz_fuzz(root, arrays, compressed, edit):
    data = bytearray(_npz(arrays, compressed))
    how = edit.draw(st.sampled_from(["none", "none", "flip", "cut", "shape", "object"]))
    if how == "flip" and data:
        data[edit.draw(st.integers(0, len(data) - 1))] ^= 1 << edit.draw(st.integers(0, 7))
    elif how == "cut":
        del data[edit.draw(st.integers(0, len(data))):]
    elif how == "shape":  # a header that claims a much larger array than the member holds
        data = bytearray(_npz(arrays, compressed, inflate=True))
    elif how == "object":
        data = bytearray(_npz({**arrays, "y_train": np.arange(6, dtype=object) % 3}, compressed))
    path = root / "input.npz"
    path.write_bytes(bytes(data))
    try:
        d = load_npz(str(path))
    except UserError as exc:
        one_line(exc, path)
        return
    for x, y in ((d.x_train, d.y_train), (d.x_test, d.y_test)):
        assert x.dtype == np.uint8 and x.ndim == 4 and y.dtype == np.int64 and len(x) == len(y) > 0
        assert 0 <= y.min() and y.max() < d.num_classes


def test_npz_refuses_before_allocating(root):
    """A corrupt header claiming a (10^11, 8, 8) array is refused from the member's size, not by an
    allocation of 6 TB; object arrays are not unpickled."""
    base = {"x_train": np.zeros((6, 8, 8), np.uint8), "y_train": np.arange(6) % 3, "x_test": np.zeros((3, 8, 8), np.uint8),
            "y_test": np.arange(3)}
    (root / "input.npz").write_bytes(_npz(base, False, inflate=True))
    with pytest.raises(BadInputError, match=r"array 'x_train': its header says shape \(99999999996, 8, 8\)"):
        load_npz(str(root / "input.npz"))
    (root / "input.npz").write_bytes(_npz({**base, "y_train": (np.arange(6) % 3).astype(object)}, False))
    with pytest.raises(BadInputError, match=r"array 'y_train' must be integer labels, got dtype object"):
        load_npz(str(root / "input.npz"))
    (root / "input.npz").write_bytes(_npz({**base, "y_train": np.array([0, 1, 2, 2**40, 0, 0])}, False))
    with pytest.raises(BadInputError, match=r"array 'y_train' has label 1099511627776 at index 3, outside \[0, C\)"):
        load_npz(str(root / "input.npz"))
    np.save(root / "input.npy", np.zeros(3))
    with pytest.raises(BadInputError, match=r"input.npy: a single .npy array, not an .npz archive"):
        load_npz(str(root / "input.npy"))
