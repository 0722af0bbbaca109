"""Class-batched DM and DSA matching steps against the per-class loop of the reference implementations,
on the CPU or a GPU: the measurement behind `matching: auto` (fastcbd/condense/run.py picks batched on a
GPU and the loop elsewhere; this script reports which one is faster on the device it runs on).

    cd /work/main && .venv/bin/python benchmarks/bench_condense.py              # CPU: MNIST-LT shapes, widths 32, 128
    .venv/bin/python benchmarks/bench_condense.py --quick --csv /tmp/x.csv      # smoke test (CPU, seconds)
    .venv/bin/python benchmarks/bench_condense.py --device cuda                 # GPU: MNIST-LT and CIFAR-10-LT shapes,
                                                                                #  widths 32, 128, batch_real 64, 256

One timed call = one matching step: the loss over all classes (DSA draw included) and its backward into
the synthetic images. Shapes (--datasets): mnist = 10 classes of 28x28x1 (MNIST-LT, rho 100: 400 ... 4
real images per class), cifar10 = 10 classes of 32x32x3 (CIFAR-10-LT, rho 100: 5000 ... 50); IPC 10 under
the tail rule (a class never gets more synthetic images than it has real ones); `batch_real` real images
per class (fewer for the tail; the condense configs' default is 256). Variants: loop (one forward per class
and side, as the reference code) and batched (one forward per side for all classes: DM with segment
means, DSA with vmap(grad) over classes). x_loop = loop / batched median (speed-up of batched); `faster`
names the faster variant and `auto_picks` what `matching: auto` runs on this device. Rows go to
benchmarks/results/condense.csv, appended after each configuration (a run stopped early keeps its rows).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

from benchmarks.harness import append_rows, machine_info, measure, print_table
from fastcbd.condense.convnet import convnet_for
from fastcbd.condense.dm import dm_loss, dm_loss_loop
from fastcbd.condense.dsa import DSA, DSAConfig
from fastcbd.condense.gm import gm_loss, gm_loss_loop

DEFAULT_CSV = ROOT / "benchmarks" / "results" / "condense.csv"
DATASETS = {  # image shape, real images per class (rho 100), DSA flip (off for digits)
    "mnist": ((1, 28, 28), [400, 239, 143, 86, 51, 30, 18, 11, 6, 4], False),
    "cifar10": ((3, 32, 32), [round(5000 * 0.01 ** (i / 9)) for i in range(10)], True),
}
COUNTS = DATASETS["mnist"][1]


def auto_matching(device: torch.device) -> str:
    """What CondenseConfig(matching="auto") runs on `device`: the library's own rule, to label the rows."""
    from fastcbd.condense.run import matching_mode

    return matching_mode("auto", device)


def inputs(batch_real: int, ipc: int, seed: int = 0, dataset: str = "mnist", device="cpu"):
    shape, counts, _ = DATASETS[dataset]
    g = torch.Generator().manual_seed(seed)
    yr = torch.cat([torch.full((min(batch_real, n),), c) for c, n in enumerate(counts)])
    ys = torch.cat([torch.full((min(ipc, n),), c) for c, n in enumerate(counts)])
    xr = torch.randn(len(yr), *shape, generator=g)
    xs = torch.randn(len(ys), *shape, generator=g)
    return xr.to(device), yr.to(device), xs.to(device), ys.to(device)


def step_fn(algo: str, batched: bool, width: int, batch_real: int, ipc: int, dataset: str = "mnist", device="cpu"):
    shape, counts, flip = DATASETS[dataset]
    k = len(counts)
    torch.manual_seed(0)
    net = convnet_for(shape, k, width=width).to(device)
    xr, yr, xs, ys = inputs(batch_real, ipc, dataset=dataset, device=device)
    aug = DSA(DSAConfig(flip=flip), seed=0)
    if algo == "dm":
        for p in net.parameters():
            p.requires_grad_(False)
        loss_fn = dm_loss if batched else dm_loss_loop

        def run(x):
            loss_fn(net.embed, xr, yr, x, ys, k, aug, aug.draw(k)).backward()
    else:
        params = {n: p.detach() for n, p in net.named_parameters()}
        loss_fn = gm_loss if batched else gm_loss_loop

        def run(x):
            loss_fn(net, params, xr, yr, x, ys, k, aug, aug.draw(k)).backward()

    def setup():
        return xs.clone().requires_grad_(True)
    return run, setup


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--datasets", nargs="+", choices=list(DATASETS), help="default: mnist (CPU), mnist cifar10 (CUDA)")
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--algos", nargs="+", default=["dm", "dsa"], choices=["dm", "dsa"])
    ap.add_argument("--batch-real", type=int, nargs="+", help="real images per class and step (default 64 on the "
                    "CPU; 64 256 on CUDA)")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=0, help="timed calls (default 5 on the CPU, 10 on CUDA)")
    ap.add_argument("--warmup", type=int, default=0, help="warm-up calls (default 1 on the CPU, 2 on CUDA)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (default 2; 1 with --quick on the CPU, robust on a loaded machine)")
    ap.add_argument("--time-budget", type=float, default=0.0,
                    help="seconds (0 = none): configurations not started within it are left out, with a note")
    ap.add_argument("--quick", action="store_true", help="mnist, width 8, 8 real per class, 1 warm-up, 2 repeats")
    ap.add_argument("--csv", default=str(DEFAULT_CSV))
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.set_num_threads(args.threads or (1 if args.quick and not cuda else 2))
    datasets = args.datasets or (["mnist", "cifar10"] if cuda else ["mnist"])
    batch_reals = args.batch_real or ([64, 256] if cuda else [64])
    widths, repeats, warmup = args.widths, args.repeats or (10 if cuda else 5), args.warmup or (2 if cuda else 1)
    if args.quick:
        datasets, widths, batch_reals, repeats, warmup = ["mnist"], [8], [8], 2, 1
    picks = auto_matching(device)
    rows, left_out = [], 0
    configs = [(d, a, w, b) for d in datasets for a in args.algos for w in widths for b in batch_reals]
    for i, (dataset, algo, width, batch_real) in enumerate(configs):
        if args.time_budget and time.perf_counter() - t_start > args.time_budget:
            left_out = len(configs) - i
            print(f"time budget of {args.time_budget:.0f} s spent: {left_out} configuration(s) left out", flush=True)
            break
        res = {}
        for variant in ("loop", "batched"):
            run, setup = step_fn(algo, variant == "batched", width, batch_real, args.ipc, dataset, device)
            res[variant] = measure(run, setup=setup, warmup=warmup, repeats=repeats, device=device, memory=False)
        ratio = res["loop"]["median_ms"] / res["batched"]["median_ms"]
        faster = "batched" if ratio > 1 else "loop"
        cfg_rows = []
        for variant, m in res.items():
            cfg_rows.append({"bench": "condense_step", "device": device.type, "dataset": dataset, "algo": algo,
                             "width": width, "batch_real": batch_real, "ipc": args.ipc, "variant": variant,
                             "median_ms": m["median_ms"], "p10_ms": m["p10_ms"], "p90_ms": m["p90_ms"],
                             "repeats": m["repeats"], "x_loop": ratio if variant == "batched" else 1.0,
                             "faster": faster, "auto_picks": picks, "quick": int(args.quick)})
        rows += cfg_rows
        if args.csv:
            append_rows(args.csv, cfg_rows)
        print(f"{dataset} {algo} width {width} batch_real {batch_real}: loop {res['loop']['median_ms']:.1f} ms, "
              f"batched {res['batched']['median_ms']:.1f} ms, x{ratio:.2f} -> {faster} faster", flush=True)
    info = machine_info()
    where = info.get("gpu") if cuda and info.get("gpu") else info.get("cpu", "")
    print(f"\n{device.type}: {where} threads={info['threads']} load1={info['load1']}")
    print_table(rows, ["dataset", "algo", "width", "batch_real", "variant", "median_ms", "p10_ms", "p90_ms", "x_loop"])
    pairs = [r for r in rows if r["variant"] == "batched"]
    n_batched = sum(r["faster"] == "batched" for r in pairs)
    agree = sum(r["faster"] == picks for r in pairs)
    print(f"\nbatched faster in {n_batched} of {len(pairs)} configurations on {device.type}; `matching: auto` runs "
          f"{picks} here: the faster one in {agree} of {len(pairs)}"
          + (f" ({left_out} configuration(s) left out by --time-budget)" if left_out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
