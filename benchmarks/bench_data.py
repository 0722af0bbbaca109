"""Images per second of the data loaders: JPEG folders (ImageNet-like) and in-memory CIFAR-sized arrays.

    cd /work/main && .venv/bin/python benchmarks/bench_data.py              # CPU: all cases (~5 min, 2 cores)
    .venv/bin/python benchmarks/bench_data.py --quick --csv /tmp/x.csv      # smoke test
    .venv/bin/python benchmarks/bench_data.py --device cuda                 # on a GPU: adds DALI mixed (nvJPEG)
    .venv/bin/python benchmarks/bench_data.py --profile                     # where a worker's time goes
    .venv/bin/python benchmarks/bench_data.py --only decode --device cuda   # batched nvJPEG decode (< 60 s)
    .venv/bin/python benchmarks/bench_data.py --only decode --device cpu --quick --csv /tmp/x.csv  # dry run

JPEG case: a generated folder (default /tmp/fastcbd_bench_jpegs, never in the repository) of --images
JPEGs of about 400x350, every variant doing the same training transform (random-resized crop to 224 +
horizontal flip + normalisation to float) over all of them, batch 64; one timed call = one pass.
  torch_pil       the plain torchvision recipe: ImageFolder-style dataset, PIL open + RandomResizedCrop
                  + RandomHorizontalFlip + ToTensor + Normalize per image, DataLoader(workers=w)
  torch_jpeg      fastcbd's fallback (loader=torch): read bytes + torchvision.io.decode_jpeg + crop on
                  uint8 tensors in the workers, normalisation batched in the main process
  dali_cpu        fastcbd's DALI pipeline on the CPU: external_source fed by the sampler, decode, then
                  random_resized_crop
  dali_cpu_fused  the same with the fused crop-decode fn.decoders.image_random_crop
  dali_cpu_reader DALI's own fn.readers.file (instance sampling only) + the fused crop-decode
  dali_gpu*       the same on a GPU with device="mixed" (nvJPEG), with --device cuda
Workers are tuned: every DataLoader variant runs with each of --workers and the best is the headline.
Array case: 50,000 CIFAR-sized uint8 images (32x32x3), random crop with 4-pixel padding + flip +
normalisation, batch 256: fastcbd's device-resident loader against the torchvision DataLoader recipe
(PIL image from the array, RandomCrop(32, 4), RandomHorizontalFlip, ToTensor, Normalize).
Ratios (x_baseline) are against the best plain-PIL DataLoader of the same case, measured in the same run.
Decode case (--only decode): --decode-images generated JPEGs of about 500x375 (random 400..600 x
300..450, quality 90, cached under --folder/decode), bytes already in memory, batches of --decode-batch:
  cpu_per_image   decode_jpeg per image in the main process, one thread
  cpu_thread_pool decode_jpeg per image in a thread pool of all the cores (the strongest CPU baseline)
  batched         fastcbd.data.nvjpeg.decode_batch: one decode_jpeg(list, device=--device) per batch
                  (nvJPEG on cuda; on the CPU the loader's CPU path, i.e. torchvision's loop)
  nvjpeg_loader   the whole loader=nvjpeg pass: read in a thread pool, decode, random-resized crop 224
                  + flip per image, batch, normalise on --device
  clean_batch,    decode_batch of the first batch, then of the same batch holding one corrupt JPEG: the
  one_bad_file    failed batched call plus the file-by-file retry that names it (retry_x: the ratio)
x_cpu_best is img/s over the best CPU decode (per image or thread pool) measured in the same run.
Rows go to benchmarks/results/data.csv.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: `python benchmarks/bench_data.py`
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.harness import append_rows, machine_info, measure, print_table  # noqa: E402
from fastcbd.data import dali as fdali  # noqa: E402
from fastcbd.data.augment import AugmentConfig  # noqa: E402
from fastcbd.data.device_loader import DeviceLoader  # noqa: E402
from fastcbd.data.files import IMAGENET_MEAN, IMAGENET_STD, ImageFiles  # noqa: E402
from fastcbd.data.samplers import InstanceSampler  # noqa: E402
from fastcbd.data.torch_loader import FileImages, TorchLoader  # noqa: E402

RRC = AugmentConfig(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=True)


def make_jpegs(folder: str, n: int, classes: int = 100, heights=(300, 400), widths=(330, 470),
               threads: int = 1) -> ImageFiles:
    """n JPEGs of random sizes in heights x widths (default ~400x350), smooth content plus texture, quality
    90; image i is drawn from its own seed, so `threads` writers make the same files. Files already there
    are kept (a cache); each is written to a temporary name first, so an interrupted run leaves none half
    written."""
    from concurrent.futures import ThreadPoolExecutor

    from torchvision.io import encode_jpeg

    paths = [os.path.join(folder, f"c{i % classes:03d}", f"{i:05d}.jpg") for i in range(n)]
    labels = np.arange(n, dtype=np.int64) % classes

    def write(i: int) -> None:
        if os.path.exists(paths[i]):
            return
        os.makedirs(os.path.dirname(paths[i]), exist_ok=True)
        g = torch.Generator().manual_seed(i)
        h = int(torch.randint(heights[0], heights[1] + 1, (1,), generator=g))
        w = int(torch.randint(widths[0], widths[1] + 1, (1,), generator=g))
        low = torch.rand(1, 3, 6, 8, generator=g) * 255
        img = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)[0]
        img = (img + torch.randn(3, h, w, generator=g) * 12).clamp(0, 255).to(torch.uint8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            data = encode_jpeg(img, quality=90).numpy().tobytes()
        tmp = f"{paths[i]}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, paths[i])

    with ThreadPoolExecutor(max(threads, 1)) as pool:
        list(pool.map(write, range(n)))
    return ImageFiles("bench_jpegs", paths, labels, classes)


class PilFolder(torch.utils.data.Dataset):
    """The plain torchvision recipe (what an ImageFolder + transforms user runs)."""

    def __init__(self, files: ImageFiles, transform):
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with open(self.files.paths[i], "rb") as f:
            img = Image.open(f).convert("RGB")
        return self.transform(img), int(self.files.labels[i])


def drain(loader) -> int:
    n = 0
    for x, y in loader:
        n += len(y)
    return n


def jpeg_cases(files: ImageFiles, args) -> list[dict]:
    import torchvision.transforms as T

    rows, n, bs = [], len(files), 64
    device = torch.device(args.device)
    pil_tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def run(name, fn, **info):
        m = measure(fn, warmup=1, repeats=args.repeats, memory=False, device=device)
        rows.append({"case": "jpeg_rrc224", "variant": name, "images": n, **info, "median_ms": m["median_ms"],
                     "p10_ms": m["p10_ms"], "p90_ms": m["p90_ms"], "img_per_s": n / (m["median_ms"] / 1000)})
        print(f"  {name:18s} {info}: {rows[-1]['img_per_s']:8.0f} img/s", flush=True)

    for w in args.workers:
        run("torch_pil", lambda w=w: drain(torch.utils.data.DataLoader(
            PilFolder(files, pil_tf), batch_size=bs, shuffle=True, num_workers=w, prefetch_factor=4 if w else None)),
            workers=w, decode="PIL")
    for w in args.workers:
        def fast(w=w):
            smp = InstanceSampler(files.labels, seed=0)
            return TorchLoader(FileImages(files, True, 224, 256, RRC), files.labels, bs, sampler=smp, aug=RRC,
                               mean=IMAGENET_MEAN, std=IMAGENET_STD, device=device, workers=w)
        run("torch_jpeg", lambda fast=fast: drain(fast()), workers=w, decode="decode_jpeg")
    if not fdali.available():
        print("  DALI is not installed: dali_* cases skipped (pip install 'fastcbd[dali]')")
        return rows
    on_gpu = device.type == "cuda"
    prefix = "dali_gpu" if on_gpu else "dali_cpu"
    for name, fused in ((prefix, False), (prefix + "_fused", True)):
        loader = fdali.DaliLoader(files, bs, sampler=InstanceSampler(files.labels), aug=RRC, device=device,
                                  mean=IMAGENET_MEAN, std=IMAGENET_STD, fused=fused, num_threads=args.threads)
        def dali_pass(loader=loader):
            loader.sampler.set_epoch(loader.sampler.epoch + 1)
            return drain(loader)

        run(name, dali_pass, workers=args.threads, decode="DALI mixed" if on_gpu else "DALI cpu")
    reader = dict(files=files.paths, labels=files.labels.tolist(), random_shuffle=True, shard_id=0, num_shards=1,
                  initial_fill=256)
    pipe = fdali.build_pipeline(None, train=True, batch_size=bs, device_id=(device.index or 0) if on_gpu else None,
                                num_threads=args.threads, aug=RRC, reader=reader)

    def reader_pass():  # the reader's epoch is its own: the same number of batches as one pass
        for _ in range(-(-n // bs)):
            fdali.to_torch(pipe.run()[0], device)

    run(prefix + "_reader", reader_pass, workers=args.threads,
        decode="DALI mixed" if on_gpu else "DALI cpu")
    return rows


def array_cases(args) -> list[dict]:
    import torchvision.transforms as T
    from PIL import Image

    rows, device = [], torch.device(args.device)
    n = 10_000 if args.quick else 50_000
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 100, n).astype(np.int64)
    mean, std = (0.507, 0.487, 0.441), (0.267, 0.256, 0.276)
    cifar = AugmentConfig(pad=4, flip=True)

    def run(name, fn, images, **info):
        m = measure(fn, warmup=1, repeats=args.repeats, memory=False, device=device)
        rows.append({"case": "cifar_arrays", "variant": name, "images": images, **info, "median_ms": m["median_ms"],
                     "p10_ms": m["p10_ms"], "p90_ms": m["p90_ms"],
                     "img_per_s": images / (m["median_ms"] / 1000)})
        print(f"  {name:18s} {info}: {rows[-1]['img_per_s']:8.0f} img/s", flush=True)

    smp = InstanceSampler(y, seed=0)
    dl = DeviceLoader(x, y, 256, sampler=smp, aug=cifar, mean=mean, std=std, device=device)

    def device_epoch():
        smp.set_epoch(smp.epoch + 1)
        return drain(dl)

    run("device_loader", device_epoch, n, workers=0, decode="-")

    class CifarPil(torch.utils.data.Dataset):
        tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])

        def __len__(self):
            return n_dl

        def __getitem__(self, i):
            return self.tf(Image.fromarray(x[i])), int(y[i])

    n_dl = n // 5  # the DataLoader is ~50x slower: one fifth of the epoch keeps the run short
    for w in args.workers:
        run("torch_dataloader", lambda w=w: drain(torch.utils.data.DataLoader(
            CifarPil(), batch_size=256, shuffle=True, num_workers=w, prefetch_factor=4 if w else None,
            pin_memory=device.type == "cuda")), n_dl, workers=w, decode="-")
    return rows


def corrupt_jpeg(data: torch.Tensor) -> torch.Tensor:
    """A copy of encoded JPEG bytes with a bogus Huffman table: markers intact (fastcbd's structural check
    passes), every decoder refuses it."""
    out = bytearray(data.numpy().tobytes())
    dht = out.index(b"\xff\xc4")
    out[dht + 4 : dht + 21] = b"\xff" * 17
    return torch.frombuffer(out, dtype=torch.uint8)


def decode_cases(args) -> list[dict]:
    """Batched decode on args.device against the best CPU decode, the whole nvjpeg loader, and one
    bad-file retry (module docstring)."""
    from concurrent.futures import ThreadPoolExecutor

    from torchvision.io import ImageReadMode, decode_jpeg

    from fastcbd.data import nvjpeg

    device, cores = torch.device(args.device), len(os.sched_getaffinity(0))
    n, bs = args.decode_images, args.decode_batch
    folder = os.path.join(args.folder, "decode")
    files = make_jpegs(folder, n, classes=10, heights=(300, 450), widths=(400, 600), threads=cores)
    datas = [nvjpeg.read_encoded(p) for p in files.paths]
    chunks = [(datas[i : i + bs], files.paths[i : i + bs]) for i in range(0, n, bs)]
    hw = np.array([nvjpeg.decode_jpegs([d], "cpu")[0].shape[1:] for d in datas[:32]]).mean(0)
    print(f"  {n} JPEGs, mean {hw[1]:.0f}x{hw[0]:.0f} (first 32), {sum(len(d) for d in datas) / n / 1024:.0f} KiB, "
          f"batch {bs}, {cores} cores", flush=True)
    rows = []

    def run(case, name, fn, images, on, warmup=1, repeats=args.repeats, **info):
        m = measure(fn, warmup=warmup, repeats=repeats, memory=False, device=on)
        rows.append({"case": case, "variant": name, "on": str(on), "images": images, "batch": bs, **info,
                     "median_ms": m["median_ms"], "p10_ms": m["p10_ms"], "p90_ms": m["p90_ms"],
                     "img_per_s": images / (m["median_ms"] / 1000)})
        print(f"  {case:12s} {name:16s} {str(on):6s} {info}: {rows[-1]['img_per_s']:8.0f} img/s "
              f"({m['median_ms']:.1f} ms)", flush=True)
        return rows[-1]

    def one(d):
        return decode_jpeg(d, mode=ImageReadMode.RGB)

    cpu = torch.device("cpu")
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs (torchcodec is not installed)
        warnings.simplefilter("ignore", DeprecationWarning)
        run("decode_jpeg", "cpu_per_image", lambda: [one(d) for d in datas], n, cpu, repeats=min(args.repeats, 2),
            workers=1)
        with ThreadPoolExecutor(cores) as pool:
            run("decode_jpeg", "cpu_thread_pool", lambda: list(pool.map(one, datas)), n, cpu, workers=cores)
    best_cpu = max(r["img_per_s"] for r in rows)
    clean = run("decode_jpeg", "batched", lambda: [nvjpeg.decode_batch(d, p, device) for d, p in chunks], n, device,
                workers=1)

    loader = nvjpeg.NvjpegLoader(files, bs, sampler=InstanceSampler(files.labels), aug=RRC, mean=IMAGENET_MEAN,
                                 std=IMAGENET_STD, device=device, workers=cores)

    def loader_pass():
        loader.sampler.set_epoch(loader.sampler.epoch + 1)
        return drain(loader)

    run("loader_rrc224", "nvjpeg_loader", loader_pass, n, device, workers=cores)
    for r in rows:
        r["x_cpu_best"] = r["img_per_s"] / best_cpu

    bad, paths = list(chunks[0][0]), list(chunks[0][1])
    bad[len(bad) // 2] = corrupt_jpeg(bad[len(bad) // 2])

    def bad_batch():
        out = nvjpeg.decode_batch(bad, paths, device)
        assert sum(isinstance(x, Exception) for x in out) == 1, "the corrupt file was not found"
        return out

    k = len(bad)
    print(f"  batched decode: {clean['x_cpu_best']:.2f}x the best CPU decode", flush=True)
    try:  # last, and guarded: should a failed nvJPEG call leave the device unusable, the rows above survive
        base = run("bad_retry", "clean_batch", lambda: nvjpeg.decode_batch(chunks[0][0], paths, device), k, device,
                   workers=1)
        retry = run("bad_retry", "one_bad_file", bad_batch, k, device, workers=1)
    except Exception as exc:  # noqa: BLE001 - reported, not hidden: the retry row is missing from the CSV
        print(f"  bad-file retry FAILED on {device}: {type(exc).__name__}: {exc}", flush=True)
        return rows
    retry["retry_x"] = retry["median_ms"] / base["median_ms"]
    print(f"  one bad file in a batch of {k}: {retry['median_ms']:.1f} ms against {base['median_ms']:.1f} ms clean "
          f"({retry['retry_x']:.1f}x)", flush=True)
    return rows


def with_ratios(rows: list[dict]) -> list[dict]:
    """x_baseline = img/s over the best plain DataLoader (PIL) of the same case; best = the best worker count."""
    for case in {r["case"] for r in rows}:
        mine = [r for r in rows if r["case"] == case]
        base = max(r["img_per_s"] for r in mine if r["variant"] in ("torch_pil", "torch_dataloader"))
        best = {}
        for r in mine:
            r["x_baseline"] = r["img_per_s"] / base
            if r["img_per_s"] > best.get(r["variant"], {}).get("img_per_s", 0):
                best[r["variant"]] = r
        for r in mine:
            r["best_of_workers"] = r is best[r["variant"]]
    return rows


def profile(files: ImageFiles, n: int = 300) -> None:
    """ms per image of each part of a worker's job (one thread, the first n files), PIL beside it, and
    the main process's batch normalisation (64 images of 3 x 224 x 224)."""
    import io
    import time

    import torchvision.transforms.v2.functional as TF
    from PIL import Image
    from torchvision.transforms import RandomResizedCrop

    from fastcbd.data.augment import normalize_
    from fastcbd.data.decode import decode_rgb, read_bytes

    paths = files.paths[:n]
    raw = [read_bytes(p) for p in paths]
    imgs = [decode_rgb(d, p) for d, p in zip(raw, paths)]
    pils = [Image.open(io.BytesIO(d)).convert("RGB") for d in raw]
    boxes = [RandomResizedCrop.get_params(im, [0.08, 1.0], [3 / 4, 4 / 3]) for im in imgs]

    def pil_crop(i):
        top, left, h, w = boxes[i]
        return pils[i].resize((224, 224), Image.BILINEAR, box=(left, top, left + w, top + h))

    parts = [("read bytes", lambda i: read_bytes(paths[i])),
             ("decode_jpeg (fastcbd)", lambda i: decode_rgb(raw[i], paths[i])),
             ("PIL decode + convert", lambda i: Image.open(io.BytesIO(raw[i])).convert("RGB").load()),
             ("uint8 resized_crop 224 (fastcbd)", lambda i: TF.resized_crop(imgs[i], *boxes[i], [224, 224], antialias=True)),
             ("PIL resize(box) 224", pil_crop)]
    print("per image, 1 thread:")
    for name, fn in parts:
        t0 = time.perf_counter()
        for i in range(len(paths)):
            fn(i)
        print(f"  {name:34s} {(time.perf_counter() - t0) / len(paths) * 1e3:6.3f} ms")
    x = torch.randint(0, 256, (64, 3, 224, 224), dtype=torch.uint8)
    mean, std = torch.tensor(IMAGENET_MEAN) * 255, torch.tensor(IMAGENET_STD) * 255
    ways = [("(x.float() - mean) / std", lambda: (x.float() - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)),
            ("x.float() only", lambda: x.float()),
            ("normalize_(x.float()) (fastcbd)", lambda: normalize_(x.float(), mean, std))]
    print("main process, one batch of 64:")
    for name, fn in ways:
        m = measure(fn, warmup=2, repeats=10, memory=False)
        print(f"  {name:34s} {m['median_ms']:6.1f} ms")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--folder", default="/tmp/fastcbd_bench_jpegs")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="DALI CPU threads")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--torch-threads", type=int, default=1,
                   help="intra-op threads of the main process (DataLoader workers use 1 each); on a shared 2-core "
                        "machine 2 threads made the batched ops ~10x slower through contention")
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", choices=["jpeg", "arrays", "decode"])
    p.add_argument("--decode-images", type=int, default=512, help="JPEGs of the decode case")
    p.add_argument("--decode-batch", type=int, default=128, help="batch of the decode case")
    p.add_argument("--quick", action="store_true",
                   help="200 images (decode: 64, batch 32), 1 repeat, workers 2: a smoke test")
    p.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "data.csv"))
    p.add_argument("--profile", action="store_true", help="where a worker's and the main process's time goes, then stop")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.repeats, args.workers = 200, 1, [2]
        args.decode_images, args.decode_batch = min(args.decode_images, 64), min(args.decode_batch, 32)
    torch.set_num_threads(args.torch_threads)
    info = machine_info()
    print(f"machine: {info}", flush=True)
    if args.profile:
        return profile(make_jpegs(args.folder, args.images))
    rows = []
    if args.only in (None, "jpeg"):
        print(f"JPEG folder {args.folder}: {args.images} images", flush=True)
        rows += jpeg_cases(make_jpegs(args.folder, args.images), args)
    if args.only in (None, "arrays"):
        print("CIFAR-sized arrays", flush=True)
        rows += array_cases(args)
    rows = with_ratios(rows)
    if rows:
        print_table(rows, ["case", "variant", "workers", "decode", "images", "median_ms", "img_per_s",
                           "x_baseline", "best_of_workers"])
    if args.only == "decode":  # only on request: it is a GPU measurement (the runner's `make gpu-check`)
        print(f"JPEG decode on {args.device}", flush=True)
        decoded = decode_cases(args)
        print_table(decoded, ["case", "variant", "on", "workers", "images", "batch", "median_ms", "img_per_s",
                              "x_cpu_best", "retry_x"])
        rows += decoded
    append_rows(args.csv, [{"bench": "data", "device": args.device, **r} for r in rows])
    print(f"appended {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
