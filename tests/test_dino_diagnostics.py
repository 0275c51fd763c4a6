"""Collapse diagnostics (teacher entropy, student-teacher KL, prototypes used) and DINOv2's KoLeo."""
import math

import pytest
import torch
import torch.nn.functional as F

from ssl_container.dino import CollapseMonitor, DINOLoss, collapse_stats, koleo_loss


def test_stats_of_a_uniform_teacher():
    k, rows = 64, 8
    p = torch.full((rows, k), 1.0 / k)
    s = collapse_stats(p, torch.tensor(math.log(k)))
    assert s["teacher_entropy"].item() == pytest.approx(math.log(k), rel=1e-6)
    assert s["kl"].item() == pytest.approx(0.0, abs=1e-5)
    assert s["prototypes_used"].item() == pytest.approx(1 / rows)  # every row's argmax is prototype 0


def test_stats_of_distinct_one_hot_rows():
    p = torch.eye(6, 10)  # six rows, each on its own prototype
    s = collapse_stats(p, torch.tensor(2.5))
    assert s["teacher_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert s["kl"].item() == pytest.approx(2.5)
    assert s["prototypes_used"].item() == pytest.approx(1.0)  # 6 of min(K=10, rows=6)


def test_kl_is_the_mean_pairwise_kl_of_the_loss():
    torch.manual_seed(0)
    k, batch, ncrops = 32, 5, 4
    loss_fn = DINOLoss(k, ncrops)
    student, teacher = torch.randn(ncrops * batch, k), torch.randn(2 * batch, k) * 3
    loss = loss_fn(student, teacher, 0.04)
    p_t = F.softmax(teacher / 0.04, dim=-1).view(2, batch, k)
    log_s = F.log_softmax(student / 0.1, dim=-1).view(ncrops, batch, k)
    kls = [(p_t[i] * (p_t[i].clamp_min(1e-30).log() - log_s[v])).sum(-1).mean()
           for i in range(2) for v in range(ncrops) if v != i]
    stats = loss_fn.last_stats
    assert stats["kl"].item() == pytest.approx(torch.stack(kls).mean().item(), rel=1e-4)
    entropy = -(p_t * p_t.clamp_min(1e-30).log()).sum(-1).mean()
    assert stats["teacher_entropy"].item() == pytest.approx(entropy.item(), rel=1e-5)
    assert loss.item() == pytest.approx(stats["kl"].item() + stats["teacher_entropy"].item(), rel=1e-6)


def _feed(monitor, loss_fn, teacher, steps):
    warnings = []
    for step in range(1, steps + 1):
        loss_fn(torch.randn(4 * 8, loss_fn.out_dim), teacher(), 0.04)
        w = monitor.update(step, {k: v.item() for k, v in loss_fn.last_stats.items()})
        if w:
            warnings.append(w)
    return warnings


def test_forced_uniform_collapse_is_named_with_its_fix():
    k = 256
    loss_fn, monitor = DINOLoss(k, 4), CollapseMonitor(k, patience=5)
    warnings = _feed(monitor, loss_fn, lambda: torch.zeros(16, k), 12)  # every logit equal: uniform
    assert len(warnings) == 1  # once, not every step
    assert "uniform" in warnings[0] and "schedule.teacher_temp" in warnings[0] and "step 5" in warnings[0]


def test_forced_one_hot_collapse_is_named_with_its_fix():
    k = 256
    loss_fn, monitor = DINOLoss(k, 4, center_momentum=1.0), CollapseMonitor(k, rows=16, patience=5)
    dominant = torch.zeros(16, k)
    dominant[:, 7] = 10.0  # one prototype wins for every image, and the frozen center never corrects it
    warnings = _feed(monitor, loss_fn, lambda: dominant + 0.01 * torch.randn(16, k), 8)
    assert len(warnings) == 1
    assert "one prototype" in warnings[0] and "sinkhorn_knopp" in warnings[0]


def test_healthy_outputs_raise_no_warning():
    torch.manual_seed(0)
    k = 256
    loss_fn, monitor = DINOLoss(k, 4), CollapseMonitor(k, rows=16, patience=3)
    assert _feed(monitor, loss_fn, lambda: torch.randn(16, k), 20) == []


def test_a_breach_must_last_patience_steps():
    monitor = CollapseMonitor(100, patience=3)
    uniform = {"teacher_entropy": math.log(100), "prototypes_used": 0.5}
    healthy = {"teacher_entropy": 1.0, "prototypes_used": 0.5}
    assert [monitor.update(i, s) for i, s in enumerate([uniform, uniform, healthy, uniform, uniform])] == [None] * 5
    assert monitor.update(6, uniform) is not None


# --- KoLeo ------------------------------------------------------------------------------------------

def test_koleo_on_hand_computed_points():
    # Three unit vectors at 0, 90 and 180 degrees: every nearest neighbour is at distance sqrt(2).
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert koleo_loss(x).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-5)
    # Norms do not matter (features are normalised); four points of a square, neighbours at sqrt(2).
    sq = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [0.0, -5.0]])
    assert koleo_loss(sq).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-5)
    # Unequal neighbours: 0 and 60 degrees are each other's neighbours (distance 1), 180 is 120 degrees
    # from 60 (distance sqrt(3)).
    a = [math.radians(d) for d in (0, 60, 180)]
    pts = torch.tensor([[math.cos(t), math.sin(t)] for t in a])
    expected = -(math.log(1.0) + math.log(1.0) + math.log(math.sqrt(3))) / 3
    assert koleo_loss(pts).item() == pytest.approx(expected, abs=1e-5)


def test_koleo_is_finite_for_duplicates_and_single_samples():
    dup = torch.ones(4, 8, requires_grad=True)
    value = koleo_loss(dup)
    value.backward()
    assert torch.isfinite(value) and value.item() > 10  # about -log(eps)
    assert torch.isfinite(dup.grad).all()
    one = torch.randn(1, 8, requires_grad=True)
    value = koleo_loss(one)
    value.backward()
    assert value.item() == 0.0 and torch.equal(one.grad, torch.zeros_like(one))


def test_koleo_gradient_spreads_features():
    torch.manual_seed(0)
    x = (torch.randn(16, 4) * 0.05 + torch.tensor([1.0, 0, 0, 0])).requires_grad_(True)
    opt = torch.optim.SGD([x], lr=0.05)
    before = koleo_loss(x).item()
    for _ in range(20):
        opt.zero_grad()
        koleo_loss(x).backward()
        opt.step()
    assert koleo_loss(x).item() < before - 0.5
