"""iNaturalist 2018 COCO-style JSON: `images` (id, file_name), `annotations` (image_id, category_id),
`categories` (id). Category ids are mapped to labels 0..C-1 in sorted order (the identity for iNat18,
whose ids are 0..8141); the test split uses the training file's mapping.
"""
from __future__ import annotations

import json
import os

from fastcbd.data.files import (
    MAX_CLASSES,
    BadInputError,
    FileSplits,
    ImageFiles,
    Problems,
    make_split,
    read_bytes,
    resolve,
    resolve_index,
)
from fastcbd.errors import ConfigError


def _load(path: str) -> dict:
    raw = read_bytes(path, "JSON file")
    try:
        data = json.loads(raw)  # UTF-8, -16 or -32 (RFC 8259 allows the three)
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{path}: invalid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    except UnicodeDecodeError as exc:
        raise BadInputError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from exc
    except (ValueError, RecursionError) as exc:  # an integer of > 4300 digits, nesting deeper than Python's stack
        raise BadInputError(f"{path}: unreadable JSON ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:200]})") from exc
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: expected a JSON object with 'images', 'annotations' and 'categories', "
                            f"got {_kind(data)}")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise BadInputError(f"{path}: no '{key}' list (a COCO-style JSON has images, annotations, categories)")
    if "categories" in data and not isinstance(data["categories"], list):
        raise BadInputError(f"{path}: 'categories' must be a list, got {_kind(data['categories'])}")
    return data


def _kind(value) -> str:
    """A JSON value as a message shows it: `an object`, `a list`, or the value (`null`, `"7"`, `1.5`)."""
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "a list"
    return json.dumps(value)[:60]


def _is_id(value) -> bool:
    """A JSON integer id (not a boolean, a float or a string), within int64."""
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def category_map(data: dict, path: str) -> dict[int, int]:
    """category id -> label 0..C-1 in sorted order of the ids, from `categories` (else from the ids the
    annotations use). Each category needs an integer 'id', no id twice; at most MAX_CLASSES of them."""
    ids: set[int] = set()
    if isinstance(data.get("categories"), list):
        for k, c in enumerate(data["categories"]):
            where = f"{path}: categories[{k}]"
            if not isinstance(c, dict) or not _is_id(c.get("id")):
                got = _kind(c.get("id")) if isinstance(c, dict) and "id" in c else "no 'id'"
                raise BadInputError(f"{where}: needs an integer 'id', got {got}")
            if c["id"] in ids:
                raise BadInputError(f"{where}: id {c['id']} appears twice in 'categories'")
            ids.add(c["id"])
    else:
        ids = {a["category_id"] for a in data["annotations"] if isinstance(a, dict) and _is_id(a.get("category_id"))}
    if len(ids) > MAX_CLASSES:
        raise BadInputError(f"{path}: {len(ids)} categories, more than the {MAX_CLASSES} a dataset may have")
    return {cid: i for i, cid in enumerate(sorted(ids))}


def read_coco(path: str, root: str, categories: dict[int, int] | None = None, *, train: bool = True,
              skip_bad: bool = False, check_files: bool = True) -> tuple[ImageFiles, dict[int, int]]:
    """One split; errors name `path` and the field (`annotations[i]`, `images[j]`, `categories[k]`).

    images[j] needs an integer 'id' (unique) and a non-empty string 'file_name'; annotations[i] an integer
    'image_id' that is in images (one annotation per image) and an integer 'category_id' that is in the
    category map (the training file's for a test split). All raise BadInputError (or are skipped with
    skip_bad); a file that is not such a JSON object raises BadInputError with or without skip_bad.
    """
    data = _load(path)
    cats = categories if categories is not None else category_map(data, path)
    problems = Problems(skip_bad)
    files: dict[int, tuple[int, str]] = {}
    for j, im in enumerate(data["images"]):
        where = f"{path}: images[{j}]"
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            problems(where, "needs 'id' and 'file_name'")
        elif not _is_id(im["id"]):
            problems(where, f"'id' must be an integer, got {_kind(im['id'])}")
        elif not isinstance(im["file_name"], str) or not im["file_name"] or "\x00" in im["file_name"]:
            problems(where, f"'file_name' must be a non-empty path, got {_kind(im['file_name'])}")
        elif im["id"] in files:
            problems(where, f"id {im['id']} is also the id of images[{files[im['id']][0]}]")
        else:
            files[im["id"]] = (j, im["file_name"])
    paths, labels, annotated = [], [], {}
    for i, a in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}]"
        if not isinstance(a, dict) or "image_id" not in a or "category_id" not in a:
            problems(where, "needs 'image_id' and 'category_id'")
            continue
        image_id, category_id = a["image_id"], a["category_id"]
        if not _is_id(image_id):
            problems(where, f"'image_id' must be an integer, got {_kind(image_id)}")
        elif not _is_id(category_id):
            problems(where, f"'category_id' must be an integer, got {_kind(category_id)}")
        elif image_id not in files:
            problems(where, f"image_id {image_id} is not in 'images'")
        elif category_id not in cats:
            problems(where, f"category_id {category_id} is not in 'categories' of the training file")
        elif image_id in annotated:
            problems(where, f"image_id {image_id} is also labelled by annotations[{annotated[image_id]}]")
        else:
            j, rel = files[image_id]
            full = resolve(root, rel)
            if check_files and not os.path.isfile(full):
                problems(f"{path}: images[{j}]", f"no such file {full}")
                continue
            annotated[image_id] = i
            paths.append(full)
            labels.append(cats[category_id])
    if not labels:
        raise BadInputError(f"{path}: no usable annotation")
    name = os.path.basename(path)
    return make_split(name, path, paths, labels, len(cats), problems, train), cats


def inat_splits(root: str, train_json: str, test_json: str, *, image_size: int = 224,
                skip_bad: bool = False) -> FileSplits:
    """iNaturalist 2018: train2018.json and val2018.json (the usual test split), images under `root`."""
    if not train_json or not test_json:
        raise ConfigError("dataset inat18: needs data.train_list and data.test_list (the COCO JSON files)")
    train, cats = read_coco(resolve_index(root, train_json), root, train=True, skip_bad=skip_bad)
    test, _ = read_coco(resolve_index(root, test_json), root, cats, train=False, skip_bad=skip_bad)
    return FileSplits("inat18", train, test, train.num_classes, image_size)
