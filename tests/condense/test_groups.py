"""The tail rule, class groups, the inter-class bias metric and two-stage classification on constructed cases."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastcbd.condense.grouping import (
    group_of,
    groups_by_frequency,
    groups_by_kmeans,
    groups_by_shots,
    inter_class_bias,
    kmeans,
)
from fastcbd.condense.hierarchical import TwoStage, group_pool, member_pool, relabel_by_group
from fastcbd.condense.pool import RealPool
from fastcbd.condense.synthetic import SyntheticSet, class_budget


def test_tail_rule_budget():
    sizes, tail = class_budget([400, 30, 10, 4, 0], 10)
    assert sizes == [10, 10, 10, 4, 10] and tail == {3: 4}
    sizes, tail = class_budget([5, 5], [3, 8])
    assert sizes == [3, 5] and tail == {1: 5}
    with pytest.raises(ValueError):
        class_budget([5, 5, 5], [1, 2])


def test_synthetic_init_from_real_and_noise():
    x = torch.arange(12.0).view(12, 1, 1, 1).expand(12, 1, 2, 2).contiguous()
    y = torch.tensor([0] * 8 + [1] * 3 + [3])  # class 2 has no image
    syn = SyntheticSet.from_real(RealPool(x, y, 4), 5, torch.Generator().manual_seed(0), soft_labels=True)
    assert syn.counts == [5, 3, 5, 1] and syn.tail_rule == {1: 3, 3: 1} and syn.noise_classes == [2]
    vals = syn.images.detach()[:, 0, 0, 0]
    assert set(vals[syn.labels == 0].tolist()) <= set(range(8)) and len(set(vals[syn.labels == 0].tolist())) == 5
    assert sorted(vals[syn.labels == 1].tolist()) == [8.0, 9.0, 10.0], "the tail class uses all its images"
    assert vals[syn.labels == 3].tolist() == [11.0]
    t = syn.targets()
    assert t.shape == (14, 4) and torch.allclose(t.sum(1), torch.ones(14)) and (t.argmax(1) == syn.labels).all()
    assert "soft_labels" in syn.export() and syn.export()["tail_rule"] == {1: 3, 3: 1}


def test_groups():
    counts = [400, 240, 143, 86, 51, 30, 18, 11, 6, 4]
    assert groups_by_frequency(counts, 2) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert groups_by_frequency([5, 50, 20], 3) == [[1], [2], [0]]
    assert groups_by_shots(counts) == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert group_of([[1, 2], [0]], 3).tolist() == [1, 0, 0]
    with pytest.raises(ValueError):
        group_of([[0, 1], [1, 2]], 3)
    with pytest.raises(ValueError):
        group_of([[0]], 2)


def test_kmeans_finds_separated_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10]], dtype=float)
    truth = np.array([0, 1, 2, 0, 1, 2, 2, 0])
    pts = centres[truth] + 0.1 * rng.standard_normal((8, 2))
    labels = kmeans(pts, 3, seed=1)
    for a in range(8):
        for b in range(8):
            assert (labels[a] == labels[b]) == (truth[a] == truth[b])
    groups = groups_by_kmeans(pts, 3, seed=0)
    assert sorted(map(sorted, groups)) == [[0, 3, 7], [1, 4], [2, 5, 6]]


def test_inter_class_bias():
    counts = [200, 150, 50, 10]  # many: 0, 1; medium 2; few 3
    target = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    pred = np.array([0, 2, 1, 1, 0, 2, 1, 1])
    b = inter_class_bias(pred, target, counts, groups=[[0, 1], [2, 3]])
    assert b["tail_to_head"] == pytest.approx(100 * 3 / 4)  # 2->0, 3->1, 3->1
    assert b["head_to_tail"] == pytest.approx(100 * 1 / 4)  # 0->2
    assert b["cross_group"] == pytest.approx(100 * 4 / 8)
    assert b["cross_group_of_errors"] == pytest.approx(100.0)


class _Fixed(torch.nn.Module):
    """Logits read from the input: image i's value picks the argmax through a lookup table."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table)

    def forward(self, x):
        return torch.nn.functional.one_hot(self.table[x[:, 0, 0, 0].long()], int(self.table.max()) + 1).float()


def test_two_stage_classifier():
    groups = [[4, 1], [0], [2, 3]]
    x = torch.arange(6.0).view(6, 1, 1, 1)  # six test images with ids 0..5
    group_net = _Fixed([0, 0, 1, 2, 2, 2])
    class_nets = [_Fixed([1, 0, 0, 0, 0, 0]), None, _Fixed([0, 0, 0, 1, 0, 1])]
    pred = TwoStage(groups, group_net, class_nets).predict(x, batch=4)
    # image 0: group 0 local 1 -> class 1; 1: group 0 local 0 -> 4; 2: group 1 -> 0; 3: group 2 local 1 -> 3;
    # 4: group 2 local 0 -> 2; 5: group 2 local 1 -> 3
    assert pred.tolist() == [1, 4, 0, 3, 2, 3]


def test_relabel_and_pools():
    groups = [[0, 2], [1]]
    x = torch.arange(7.0).view(7, 1, 1, 1)
    y = torch.tensor([0, 0, 0, 0, 2, 1, 1])
    gt, sets = relabel_by_group(x, y, groups, 3)
    assert gt.tolist() == [0, 0, 0, 0, 0, 1, 1] and sets[1] is None
    assert sets[0][1].tolist() == [0, 0, 0, 0, 1] and sets[0][0][:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]
    mp = member_pool(RealPool(x, y, 3), [2, 0])
    assert mp.y.tolist() == [1, 1, 1, 1, 0] and mp.num_labels == 2
    gp = group_pool(RealPool(x, y, 3), groups)
    idx = gp.indices(0, 400, torch.Generator().manual_seed(0))
    share_tail = (y[idx] == 2).float().mean().item()
    assert 0.45 < share_tail < 0.55, f"class-balanced inside the group: class 2 drew {share_tail:.2f} of the draws"


@pytest.mark.parametrize("matching,device,loop", [("auto", "cpu", True), ("auto", "cuda", False),
                                                  ("batched", "cpu", False), ("loop", "cuda", True)])
def test_matching_form_follows_the_device(monkeypatch, matching, device, loop):
    """DM / DSA run the per-class loop on the CPU (faster there) and the class-batched form on a GPU,
    unless --matching says otherwise."""
    from fastcbd.condense import run

    seen = []
    monkeypatch.setattr(run, "distill_dm", lambda *a, loop=False, **k: seen.append(("dm", loop)))
    monkeypatch.setattr(run, "distill_gm", lambda *a, loop=False, **k: seen.append(("dsa", loop)))
    runner = run.Runner.__new__(run.Runner)
    runner.cfg, runner.progress, runner.clock = run.CondenseConfig(matching=matching, device=device), False, None
    pool = SimpleNamespace(num_labels=3)  # the distiller reads the pool's size to weight its timing (eta.py)
    for method in ("dm", "dsa"):
        runner.distiller(method, 0, None)(pool, None, 0, "all")
    assert seen == [("dm", loop), ("dsa", loop)]
    runner.cfg.matching = "vectorised"
    with pytest.raises(ValueError, match="matching='vectorised'"):
        runner.distiller("dm", 0, None)
