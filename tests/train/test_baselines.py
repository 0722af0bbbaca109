"""Each long-tail baseline's defining property, and the demo's opt-in baseline list."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_stages import tiny_ctx

from fastcbd.train.baselines import (
    BASELINES,
    LWS,
    PostHocAdjusted,
    balanced_softmax_loss,
    class_balanced_weights,
    log_prior,
    logit_adjusted_loss,
    run_baseline,
    tau_normalize,
)

COUNTS = [40, 12, 4, 1, 7]


def _batch(seed=0, b=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, len(COUNTS), generator=g, dtype=torch.float64), torch.randint(0, len(COUNTS), (b,), generator=g)


def test_logit_adjusted_loss_is_ce_on_adjusted_logits_and_ce_at_tau_0():
    z, y = _batch()
    lp = log_prior(COUNTS).double()
    for tau in (0.0, 0.5, 1.0, 2.0):
        ref = F.cross_entropy(z + tau * lp, y)
        got = logit_adjusted_loss(z, y, lp, tau)
        assert torch.allclose(got, ref, rtol=0, atol=1e-12), f"tau={tau}: {got} vs {ref}"
    assert torch.allclose(logit_adjusted_loss(z, y, lp, 0.0), F.cross_entropy(z, y), rtol=0, atol=1e-12)
    assert abs(lp.exp().sum().item() - 1) < 1e-6, "log_prior must be a log distribution"


def test_balanced_softmax_is_the_count_weighted_softmax():
    z, y = _batch(1)
    n = torch.tensor(COUNTS, dtype=torch.float64)
    p = n * z.exp() / (n * z.exp()).sum(dim=1, keepdim=True)  # Ren et al. eq.: n_j e^{z_j} / sum
    ref = -p[torch.arange(len(y)), y].log().mean()
    got = balanced_softmax_loss(z, y, COUNTS)
    assert abs(got.item() - ref.item()) < 1e-6, f"{got.item()} vs {ref.item()}"
    assert abs(got.item() - logit_adjusted_loss(z, y, log_prior(COUNTS).double(), 1.0).item()) < 1e-6


def test_class_balanced_weights_beta_0_is_ce_and_beta_to_1_is_inverse_frequency():
    assert torch.equal(class_balanced_weights(COUNTS, 0.0), torch.ones(len(COUNTS)))
    z, y = _batch(2)
    w = class_balanced_weights(COUNTS, 0.0).double()
    assert torch.allclose(F.cross_entropy(z, y, weight=w), F.cross_entropy(z, y), rtol=0, atol=1e-12)
    w = class_balanced_weights(COUNTS, 1 - 1e-9).double()
    inv = 1 / torch.tensor(COUNTS, dtype=torch.float64)
    assert torch.allclose(w / w.sum(), inv / inv.sum(), rtol=1e-4), f"{w / w.sum()} vs {inv / inv.sum()}"
    w = class_balanced_weights(COUNTS, 0.99)
    assert abs(w.mean().item() - 1) < 1e-6 and all(a >= b for a, b in zip(w[np.argsort(COUNTS)], w[np.argsort(COUNTS)][1:]))


def test_tau_norm_tau_0_is_unchanged_and_tau_1_gives_unit_rows():
    w = torch.randn(5, 7, dtype=torch.float64) * torch.arange(1, 6, dtype=torch.float64)[:, None]
    assert torch.equal(tau_normalize(w, 0.0), w)
    assert torch.allclose(tau_normalize(w, 1.0).norm(dim=1), torch.ones(5, dtype=torch.float64))
    half = tau_normalize(w, 0.5)
    assert torch.allclose(half.norm(dim=1), w.norm(dim=1).sqrt())
    assert torch.allclose(F.normalize(half, dim=1), F.normalize(w, dim=1)), "tau-norm keeps each direction"


def test_post_hoc_adjustment_subtracts_tau_log_prior():
    base = torch.nn.Linear(3, len(COUNTS))
    x = torch.randn(4, 3)
    m = PostHocAdjusted(base, COUNTS, tau=0.7)
    assert torch.allclose(m(x), base(x) - 0.7 * log_prior(COUNTS), atol=1e-6)
    assert torch.equal(PostHocAdjusted(base, COUNTS, tau=0.0)(x), base(x))


def test_lws_starts_at_the_model_and_trains_only_the_scales(tmp_path):
    ctx = tiny_ctx(tmp_path, **{"crt.epochs": 2, "teacher.optim.epochs": 1})
    teacher = run_baseline(ctx, "ce_balanced", None, 1)
    x = torch.randn(5, 1, 16, 16)
    assert torch.equal(LWS(teacher, 3)(x), teacher(x)), "LWS with s = 1 must be the wrapped model"
    before = {n: v.clone() for n, v in teacher.state_dict().items()}
    lws = run_baseline(ctx, "lws", teacher, 2)
    for n, v in lws.model.state_dict().items():
        assert torch.equal(v, before[n]), f"LWS changed the frozen model's {n}"
    assert not torch.equal(lws.scale, torch.ones(3)), "the per-class scales did not train"


def test_tau_norm_and_posthoc_heads_keep_the_frozen_backbone_and_apply_their_formula(tmp_path):
    ctx = tiny_ctx(tmp_path, **{"crt.epochs": 1, "teacher.optim.epochs": 1, "baselines.logit_tau": 0.7})
    teacher = run_baseline(ctx, "ce_balanced", None, 1)
    x = ctx.test_loader().__iter__().__next__()[0]
    tau = run_baseline(ctx, "tau_norm", teacher, 3)  # baselines.tau = 1: every class vector of unit norm
    norms = tau.classifier.weight.norm(dim=1)
    assert torch.allclose(norms, torch.ones(3), atol=1e-5), f"tau-norm (tau 1) left norms {norms.tolist()}"
    assert torch.equal(tau.backbone(x), teacher.backbone(x)), "tau-norm changed the frozen backbone"
    post = run_baseline(ctx, "logit_adj_posthoc", teacher, 3)
    expected = teacher(x) - 0.7 * log_prior(ctx.splits.class_counts)
    assert torch.allclose(post(x), expected, atol=1e-6), "post-hoc adjustment is not z - tau log pi"


@pytest.mark.parametrize("name", ["balanced_softmax", "logit_adj_loss", "cb_ce"])
def test_loss_baselines_train_with_their_own_loss(tmp_path, monkeypatch, name):
    """The loss each baseline hands the training stage is its formula on this dataset's class counts."""
    import fastcbd.train.baselines as B

    ctx = tiny_ctx(tmp_path, **{"teacher.optim.epochs": 1, "baselines.logit_tau": 0.5, "baselines.cb_beta": 0.99})
    seen = {}
    real = B.train_teacher

    def spy(*args, loss_fn=None, **kw):
        seen["fn"] = loss_fn
        return real(*args, loss_fn=loss_fn, **kw)

    monkeypatch.setattr(B, "train_teacher", spy)
    model = run_baseline(ctx, name, None, 3)
    counts = torch.tensor(ctx.splits.class_counts, dtype=torch.float64)  # 40, 12, 4
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(64, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (64,), generator=g)
    if name == "balanced_softmax":
        want = F.cross_entropy(z + counts.log(), y)
    elif name == "logit_adj_loss":
        want = F.cross_entropy(z + 0.5 * (counts / counts.sum()).log(), y)
    else:
        w = (1 - 0.99) / (1 - 0.99 ** counts)
        want = F.cross_entropy(z, y, weight=w * 3 / w.sum())
    got = seen["fn"](z, y)
    assert abs(got.item() - want.item()) < 1e-6, f"{name}: loss {got.item()} != formula {want.item()}"
    assert torch.isfinite(model(ctx.test_loader().__iter__().__next__()[0])).all()


def test_unknown_baseline_is_named(tmp_path):
    with pytest.raises(ValueError, match="'focal'"):
        run_baseline(tiny_ctx(tmp_path), "focal", None, 0)
    assert set(BASELINES) >= {"crt", "lws", "tau_norm", "balanced_softmax", "logit_adj_loss", "cb_ce"}


def test_demo_table_takes_the_opt_in_baselines(tmp_path):
    from test_stages import tiny_splits

    from fastcbd.train.config import load_config
    from fastcbd.train.pipeline import run_cbd

    cfg = load_config(None, ["teacher.optim.epochs=1", "student.optim.epochs=1", "crt.epochs=1", "data.batch_size=16",
                             "model.width=4", "teacher.kinds=[vanilla]", f"baselines.methods=[{','.join(BASELINES)}]"])
    r = run_cbd(cfg, str(tmp_path / "run"), splits=tiny_splits(), progress=False)
    assert list(r["methods"]) == ["teacher_vanilla_1", *BASELINES, "cbd"], list(r["methods"])
    assert "| lws |" in (tmp_path / "run" / "results.md").read_text()
    with pytest.raises(ValueError, match="unknown \\['focal'\\]"):
        run_cbd(load_config(None, ["baselines.methods=[crt,focal]"]), str(tmp_path / "x"), splits=tiny_splits())
