"""Samplers over dataset indices: instance, class-balanced, square-root and progressive.

Each draws one global sequence per epoch from (seed, epoch), so every rank of a distributed run draws
the same sequence and keeps a disjoint, equal-length share (rank::world_size). `state_dict()` holds the
epoch and how many indices of it were consumed, so a run resumes in the middle of an epoch.
`sample_seeds` keys each sample's augmentation on its position in that sequence, so the loaders that
cut crops outside a checkpointed generator (DataLoader workers, DALI) resume exactly too.
"""
from __future__ import annotations

import numpy as np


class _Sampler:
    def __init__(self, targets, *, num_samples: int | None = None, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.targets = np.asarray(targets, dtype=np.int64)
        if self.targets.ndim != 1 or len(self.targets) == 0:
            raise ValueError(f"targets must be a non-empty 1-D array of labels, got shape {self.targets.shape}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.num_samples = int(num_samples) if num_samples is not None else len(self.targets)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch = 0
        self.consumed = 0  # indices of this rank's share already yielded in the current epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.consumed = 0
        self.epoch = int(epoch)

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    def draw(self) -> np.ndarray:
        """The global sequence of this epoch (all ranks), length a multiple of world_size."""
        raise NotImplementedError

    def indices(self) -> np.ndarray:
        """This rank's share of the epoch, from the resume point on."""
        share = self.draw()[self.rank :: self.world_size]
        return share[self.consumed :]

    def advance(self, n: int) -> None:
        """Record that n more indices of this epoch were consumed (for exact resume)."""
        self.consumed += int(n)

    def __len__(self) -> int:
        return -(-self.num_samples // self.world_size)

    def __iter__(self):
        for i in self.indices():
            self.consumed += 1
            yield int(i)

    def _total(self) -> int:
        return len(self) * self.world_size

    def state_dict(self) -> dict:
        return {"sampler": type(self).__name__, "epoch": self.epoch, "consumed": self.consumed, "seed": self.seed,
                "num_samples": self.num_samples, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume where `state` was taken. The draw depends on the sampler, num_samples and world_size,
        so a state taken with other values cannot resume exactly and is refused."""
        for key in ("sampler", "num_samples", "world_size"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise ValueError(f"sampler state has {key}={state[key]!r}, this sampler has {mine!r}: "
                                 "cannot resume the same sequence")
        self.epoch, self.consumed, self.seed = int(state["epoch"]), int(state["consumed"]), int(state["seed"])


class InstanceSampler(_Sampler):
    """Every image equally likely: a fresh permutation each epoch (repeated if num_samples > N)."""

    def draw(self) -> np.ndarray:
        rng, n, total = self._rng(), len(self.targets), self._total()
        reps = -(-total // n)
        return np.concatenate([rng.permutation(n) for _ in range(reps)])[:total]


class _ClassWeighted(_Sampler):
    """Draw a class from `class_probs()`, then an image uniformly within it (with replacement)."""

    def __init__(self, targets, *, num_classes: int | None = None, allow_empty: bool = False, **kw):
        super().__init__(targets, **kw)
        self.num_classes = int(num_classes) if num_classes else int(self.targets.max()) + 1
        order = np.argsort(self.targets, kind="stable")
        self.counts = np.bincount(self.targets, minlength=self.num_classes)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.by_class = order
        if (self.counts == 0).any() and not allow_empty:
            empty = np.flatnonzero(self.counts == 0).tolist()
            raise ValueError(f"targets: class(es) {empty} have no image; a class-weighted sampler needs every class "
                             "(allow_empty=True gives them probability 0)")

    def class_probs(self) -> np.ndarray:
        """(C,) float64 probability of each class; empty classes are given 0 by draw()."""
        raise NotImplementedError

    def target_probs(self) -> np.ndarray:
        """The class distribution this epoch's draw follows (empty classes removed, renormalised)."""
        p = np.where(self.counts > 0, self.class_probs(), 0.0)
        return p / p.sum()

    def draw(self) -> np.ndarray:
        rng, total = self._rng(), self._total()
        classes = rng.choice(self.num_classes, size=total, p=self.target_probs())
        within = np.floor(rng.random(total) * self.counts[classes]).astype(np.int64)
        return self.by_class[self.starts[classes] + within]


class ClassBalancedSampler(_ClassWeighted):
    """Every class equally likely, then an image uniformly within it (the CBD student's sampling)."""

    def class_probs(self) -> np.ndarray:
        return np.full(self.num_classes, 1.0 / self.num_classes)


class SqrtSampler(_ClassWeighted):
    """Class probability proportional to sqrt(n_c)."""

    def class_probs(self) -> np.ndarray:
        w = np.sqrt(self.counts.astype(np.float64))
        return w / w.sum()


class ProgressiveSampler(_ClassWeighted):
    """Kang et al. (ICLR 2020): p_c(t) = (1 - t/T) n_c / N + (t/T) / C, t = epoch, T = epochs: instance
    sampling at the first epoch, moving linearly towards class-balanced."""

    def __init__(self, targets, *, epochs: int, **kw):
        super().__init__(targets, **kw)
        if epochs < 1:
            raise ValueError(f"ProgressiveSampler epochs={epochs}: expected >= 1")
        self.epochs = int(epochs)

    def class_probs(self) -> np.ndarray:
        t = min(self.epoch / self.epochs, 1.0)
        n = self.counts.astype(np.float64)
        present = (n > 0).sum()
        return (1 - t) * n / n.sum() + t * (n > 0) / present


SAMPLERS = {"instance": InstanceSampler, "balanced": ClassBalancedSampler, "sqrt": SqrtSampler,
            "progressive": ProgressiveSampler}


class SampledLoader:
    """What the loaders share: batches follow `sampler` (sequential order without one), and the
    augmentation generator `gen` can be checkpointed between batches. Needs sampler, labels,
    batch_size, drop_last and gen; `_resume_gen` is picked up by the loader's next __iter__."""

    _resume_gen = None

    def state_dict(self) -> dict:
        """The augmentation generator's state (taken between batches)."""
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """The next iteration continues the generator from `state` instead of re-seeding it."""
        self._resume_gen = state["gen"]

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self) -> np.ndarray:
        return self.sampler.indices() if self.sampler is not None else np.arange(len(self.labels))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 values (a bijection that scatters nearby inputs)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sample_seeds(seed: int, epoch: int, positions) -> np.ndarray:
    """(n,) int64 >= 0: the augmentation seed of the samples at `positions` of an epoch's order.

    A function of (loader seed, epoch, position) only: not of the image index (a class-balanced draw
    repeats images within an epoch), nor of where a run was resumed, how many workers there are or which
    of them decodes the sample. A resumed run therefore draws each sample's crop and flip again exactly."""
    with np.errstate(over="ignore"):
        key = splitmix64(np.uint64(seed & (2**64 - 1)) + _GOLDEN)
        key = splitmix64(key ^ np.uint64(epoch & (2**64 - 1)))
        z = splitmix64(key + np.asarray(positions, dtype=np.uint64) * _GOLDEN)
    return (z >> np.uint64(1)).astype(np.int64)


def sample_uniforms(seeds, n: int) -> np.ndarray:
    """(len(seeds), n) float64 in [0, 1): the first n outputs of a SplitMix64 stream seeded with each
    seed, for a whole batch in a few array ops (no generator object per sample)."""
    with np.errstate(over="ignore"):
        z = np.asarray(seeds, dtype=np.int64).astype(np.uint64)[:, None] + np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN
    return (splitmix64(z) >> np.uint64(11)) * (1.0 / (1 << 53))


def build_sampler(name: str, targets, **kw) -> _Sampler:
    """A sampler by name; `num_classes` / `allow_empty` apply to the class-weighted ones, `epochs` to
    progressive (both are ignored where they do not apply)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r}: expected one of {', '.join(SAMPLERS)}")
    cls = SAMPLERS[name]
    if cls is InstanceSampler:
        kw = {k: v for k, v in kw.items() if k not in ("num_classes", "allow_empty", "epochs")}
    elif cls is not ProgressiveSampler:
        kw.pop("epochs", None)
    elif kw.get("epochs") is None:
        raise ValueError("sampler 'progressive' needs epochs (the T of p_c(t))")
    return cls(targets, **kw)
