"""What makes relabeling and RLDD pay on MNIST-LT (rho 100, IPC 10): the ablations behind the `--relabel auto`
teacher, the default `--relabel-tau` and the cpu preset's RLDD settings (docs/condense.md, "Soft relabeling
and RLDD"). Each row: one synthetic-set construction x one label kind, mean over `--repeats` evaluation
models (ConvNet-3 width 32, 300 SGD steps, the condense evaluation), per seed.

    .venv/bin/python benchmarks/ablate_condense.py --split val --teacher 32:1500 --labels hard kl1 kl2 kl4 kl8
    .venv/bin/python benchmarks/ablate_condense.py --teacher 32:1500 --seeds 3 --labels kl2 \\
        --sets random div div+rec crops_div teacher_div
    .venv/bin/python benchmarks/ablate_condense.py --seeds 3 --labels kl2 --sets random random_bal real40_bal pool_bal
    .venv/bin/python benchmarks/ablate_condense.py --seeds 5 --labels kl2 --ipc 1 2 5 10 --sets random teacher_div dm

Sets: random (a random real subset); dm (the cpu preset's DM from that subset, 100 iterations; dm<N>: N);
conf_crops (the paper-style initialisation: confident and diverse crops, 8 candidates per image, the most
confident half); conf_real (real images only, the confident half); div (real images picked for diversity alone
in the observer's features); teacher_div (the same in the teacher's features, no observer); crops_div (crops
picked for diversity alone); uncertain (each class's real images the teacher is least sure of); suffix +rec:
then 100 recovery iterations at lr_img 0.01 (+rec05: at 0.05). The headroom of the images (what any 10 images
per class could add at most): real<N> (a random real subset of N per class, tail rule as usual) and pool
(every real image); suffix _bal evaluates a set class-balanced (each class's images repeated to the largest
class's count, so that the epochs draw the classes equally; random_bal is the control at 10 per class).
Labels: hard, or kl<tau> (relabeled by the teacher at temperature tau). Teacher W:S: a ConvNet-3 of width W
(linear head) trained S steps with balanced softmax under DSA (the experiments; `--relabel auto` trains the
same network with a cosine classifier).
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.harness import append_rows
from fastcbd.condense.convnet import convnet_for
from fastcbd.condense.dm import DMConfig, distill_dm
from fastcbd.condense.dsa import DSA, DSAConfig
from fastcbd.condense.evaluate import EvalConfig, sgd_steps, train_classifier
from fastcbd.condense.pool import RealPool, channel_stats, to_tensor
from fastcbd.condense.presets import CPU
from fastcbd.condense.relabel import SoftLabeler
from fastcbd.condense.rldd import RLDDConfig, distill_rldd, select_init
from fastcbd.condense.synthetic import SyntheticSet
from fastcbd.data.arrays import mnist_lt
from fastcbd.train.metrics import shot_accuracy

DSA_CFG = DSAConfig(flip=False)
KEYS = ("all", "many", "medium", "few")


class Data:
    def __init__(self, split: str):
        sp = mnist_lt(100, seed=0, split=split)
        self.mean, self.std = channel_stats(sp.x_train)
        self.x, self.y = to_tensor(sp.x_train, self.mean, self.std), torch.from_numpy(sp.y_train)
        self.x_test, self.y_test = to_tensor(sp.x_test, self.mean, self.std), sp.y_test
        self.k, self.counts = sp.num_classes, sp.class_counts
        self.pool = RealPool(self.x, self.y, self.k)


def train_teacher(d: Data, width: int, steps: int, seed: int = 0):
    prior = torch.tensor(d.counts, dtype=torch.float).log()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    aug = DSA(DSA_CFG, 1000 + seed)
    net = convnet_for(tuple(d.x.shape[1:]), d.k, width, 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(0, len(d.x), (128,), generator=gen)
        return F.cross_entropy(net(aug(d.x[idx], aug.draw(len(idx)))) + prior, d.y[idx])  # balanced softmax

    sgd_steps(opt, sched, steps, batch_loss)
    return net.eval()


@torch.no_grad()
def accuracy(d: Data, f) -> dict:
    pred = torch.cat([f(d.x_test[i:i + 500]).argmax(1) for i in range(0, len(d.x_test), 500)]).numpy()
    r = shot_accuracy(pred, d.y_test, d.counts)
    return {k: r[k] for k in KEYS}


def evaluate(d: Data, x, y, labels: str, seed: int, teacher, steps: int = 300) -> dict:
    """The condense evaluation (train_classifier: ConvNet-3 width 32, batches of 128, DSA) with the stored
    labels (hard) or relabeled by the teacher at temperature tau (kl<tau>)."""
    lab = None if labels == "hard" else SoftLabeler(teacher, float(labels[2:]), [0.0], [1.0])
    net = train_classifier(x, y, d.k, EvalConfig(steps=steps, batch=128, width=32), seed, DSA(DSA_CFG, seed),
                           teacher=lab)
    return accuracy(d, net)


def balance_by_repeat(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each label's rows repeated (cyclically) to the largest label's count: epochs of the result draw the
    labels equally, the images of a label each as often as the others of that label (within one)."""
    counts = torch.bincount(y)
    top = int(counts.max())
    rows = [torch.nonzero(y == c).flatten() for c in range(len(counts)) if counts[c] > 0]
    idx = torch.cat([r.repeat((top + len(r) - 1) // len(r))[:top] for r in rows])
    return x[idx], y[idx]


def build_set(d: Data, name: str, seed: int, teacher, ipc: int = 10) -> SyntheticSet:
    if name.startswith(("real", "pool")):  # headroom sets: real<N> per class, or the whole pool
        per = int(name[4:]) if name.startswith("real") else max(d.counts)
        return SyntheticSet.from_real(d.pool, per, torch.Generator().manual_seed(seed))
    syn = SyntheticSet.from_real(d.pool, ipc, torch.Generator().manual_seed(seed))
    base, _, rec = name.partition("+")
    if base == "uncertain":  # each class's real images the teacher is least sure of (exploration)
        with torch.no_grad():
            for c in range(d.k):
                slots = torch.nonzero(syn.labels == c).flatten()
                real = d.pool.x[d.pool.by_label[c]]
                conf = teacher(real).softmax(1)[:, c]
                syn.images.data[slots] = real[conf.argsort()[:len(slots)]]
        return syn
    if base.startswith("dm"):  # the cpu preset's DM from this random real subset; dm<N>: N iterations
        dm = DMConfig(**{**CPU["dm"], "width": CPU["width"]})
        dm.iterations = int(base[2:] or dm.iterations)
        distill_dm(d.pool, syn, dm, DSA(DSA_CFG, seed), seed)
        return syn
    if base == "random":
        if rec:
            raise ValueError("random+rec: use div+rec")
        return syn
    cfg = RLDDConfig(observer_steps=300, observer_batch=128, width=32, init_rounds=3,
                     iterations=100 if rec else 0, lr_img=0.05 if rec == "rec05" else 0.01)
    cfg.init_candidates, cfg.keep = {"conf_crops": (8, 0.5), "conf_real": (0, 0.5), "div": (0, 1.0),
                                     "teacher_div": (0, 1.0), "crops_div": (8, 1.0)}[base]
    scorer = lambda z: teacher(z).softmax(1)
    if base == "teacher_div":
        select_init(d.pool, syn, scorer, teacher.embed, cfg, seed)
    else:
        distill_rldd(d.pool, syn, cfg, DSA(DSA_CFG, seed), seed, scorer=scorer)
    return syn


def evaluate_sets(d: Data, a, teacher, pool: ThreadPoolExecutor, ipc: int, seed: int, common: dict) -> list[dict]:
    """One row per (set, labels) of a.sets x a.labels at this IPC and seed (mean of a.repeats models)."""
    rows = []
    for name in a.sets:
        base, bal, _ = name.partition("_bal")
        syn = build_set(d, base, seed, teacher, ipc)
        x, y = syn.images.detach(), syn.labels
        if bal:
            x, y = balance_by_repeat(x, y)
        for labels in a.labels:
            t = time.perf_counter()

            def one(r, x=x, y=y, labels=labels):
                return evaluate(d, x, y, labels, seed * 10 + r, teacher, a.eval_steps)

            runs = list(pool.map(one, range(a.repeats)))
            m = {k: round(float(np.mean([r[k] for r in runs])), 2) for k in KEYS}
            rows.append({**common, "set": name, "labels": labels, "seed": seed, **m,
                         "seconds": round(time.perf_counter() - t, 1)})
            scores = "  ".join(f"{k} {m[k]:.2f}" for k in KEYS)
            print(f"ipc {ipc}  seed {seed}  {name:12s} {labels:5s} {scores}", flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--teacher", default="32:1500", help="W:S, a ConvNet-3 of width W trained S steps")
    p.add_argument("--sets", nargs="+", default=["random", "div"])
    p.add_argument("--labels", nargs="+", default=["hard", "kl2"])
    p.add_argument("--ipc", type=int, nargs="+", default=[10],
                   help="images per class of the sets (not real<N> / pool), each in turn with the same teacher")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--eval-steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=1,
                   help="a set's evaluation models trained at once in threads (each has its own "
                   "augmentation seed: the same results)")
    p.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "condense_ablation.csv"))
    p.add_argument("--note", default="")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    d = Data(a.split)
    t0 = time.perf_counter()
    width, steps = (int(v) for v in a.teacher.split(":"))
    teacher = train_teacher(d, width, steps)
    common = {"command": "python benchmarks/ablate_condense.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "note": a.note, "split": a.split, "teacher": a.teacher, "repeats": a.repeats,
              "eval_steps": a.eval_steps, "threads": a.threads}
    t_acc = accuracy(d, teacher)
    rows = [{**common, "set": "teacher", "labels": "", "seed": "", **{k: round(t_acc[k], 2) for k in KEYS},
             "seconds": round(time.perf_counter() - t0, 1)}]
    print(f"teacher {a.teacher}: " + "  ".join(f"{k} {t_acc[k]:.2f}" for k in KEYS), flush=True)
    with ThreadPoolExecutor(max(1, a.workers)) as pool:  # one worker: one model after another
        for ipc in a.ipc:
            for seed in range(a.first_seed, a.first_seed + a.seeds):
                rows += evaluate_sets(d, a, teacher, pool, ipc, seed, {**common, "ipc": ipc})
    append_rows(a.csv, rows)
    print(f"rows appended to {a.csv}")


if __name__ == "__main__":
    main()
