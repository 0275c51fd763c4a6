"""DINOLoss and Sinkhorn-Knopp against hand computations (plain Python loops and numbers)."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_container.dino import DINOHead, DINOLoss, sinkhorn_knopp

# --------------------------------------------------------------------------- references


def _softmax(row: list[float], temp: float) -> list[float]:
    m = max(row)
    e = [math.exp((x - m) / temp) for x in row]
    s = sum(e)
    return [x / s for x in e]


def _log_softmax(row: list[float], temp: float) -> list[float]:
    z = [x / temp for x in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(x - m) for x in z))
    return [x - lse for x in z]


def _reference_loss(
    student: list[list[float]],
    teacher: list[list[float]],
    center: list[float],
    ncrops: int,
    nglobal: int,
    tau_s: float,
    tau_t: float,
) -> tuple[float, int]:
    """DINO's loss written as the paper states it: loop over pairs, skip same view."""
    batch = len(student) // ncrops
    total, terms = 0.0, 0
    for i in range(nglobal):
        for v in range(ncrops):
            if v == i:
                continue
            pair = 0.0
            for b in range(batch):
                t_row = [x - c for x, c in zip(teacher[i * batch + b], center)]
                p = _softmax(t_row, tau_t)
                ls = _log_softmax(student[v * batch + b], tau_s)
                pair += -sum(pk * lk for pk, lk in zip(p, ls))
            total += pair / batch
            terms += 1
    return total / terms, terms


# --------------------------------------------------------------------------- loss values


def test_two_globals_eight_locals_matches_pair_loop() -> None:
    torch.manual_seed(0)
    ncrops, batch, k = 10, 3, 5
    student = torch.randn(ncrops * batch, k, dtype=torch.float64)
    teacher = torch.randn(2 * batch, k, dtype=torch.float64)
    loss_fn = DINOLoss(k, ncrops)
    loss = loss_fn(student, teacher, 0.04)
    expected, terms = _reference_loss(
        student.tolist(), teacher.tolist(), [0.0] * k, ncrops, 2, 0.1, 0.04
    )
    assert terms == 18 == loss_fn.n_loss_terms
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.dtype == torch.float32 and loss.ndim == 0


def test_two_globals_two_locals_hand_numbers_and_center() -> None:
    """K = 2, B = 1. Teacher: crop 0 uniform, crop 1 -> (3/4, 1/4).

    Student log-probabilities: crop 0 and 3 -> (ln 1/2, ln 1/2); crop 1 -> (ln 3/4, ln 1/4);
    crop 2 -> (ln 1/4, ln 3/4). The six pairs (0,1) (0,2) (0,3) (1,0) (1,2) (1,3) give
    1/2 ln(16/3), 1/2 ln(16/3), ln 2, ln 2, 3/4 ln 4 + 1/4 ln(4/3), ln 2.
    """
    tau_s, tau_t = 0.1, 0.04
    ln3 = math.log(3.0)
    teacher = torch.tensor([[0.0, 0.0], [ln3 * tau_t, 0.0]], dtype=torch.float64)
    student = torch.tensor(
        [[0.0, 0.0], [ln3 * tau_s, 0.0], [0.0, ln3 * tau_s], [0.0, 0.0]], dtype=torch.float64
    )
    loss_fn = DINOLoss(2, ncrops=4, student_temp=tau_s, center_momentum=0.9)
    loss = loss_fn(student, teacher, tau_t)
    expected = (
        0.5 * math.log(16 / 3) * 2
        + math.log(2) * 3
        + 0.75 * math.log(4) + 0.25 * math.log(4 / 3)
    ) / 6
    assert loss_fn.n_loss_terms == 6
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # center: 0.9 * 0 + 0.1 * mean of the two teacher rows = (0.1 * ln3 * 0.04 / 2, 0)
    assert loss_fn.center.tolist()[0] == pytest.approx([0.1 * ln3 * tau_t / 2, 0.0], abs=1e-9)


def test_center_is_ema_updated_after_the_loss() -> None:
    torch.manual_seed(1)
    k, ncrops, batch = 4, 3, 2
    loss_fn = DINOLoss(k, ncrops, center_momentum=0.9)
    t1 = torch.randn(2 * batch, k, dtype=torch.float64)
    t2 = torch.randn(2 * batch, k, dtype=torch.float64)
    s1 = torch.randn(ncrops * batch, k, dtype=torch.float64)
    s2 = torch.randn(ncrops * batch, k, dtype=torch.float64)

    l1 = loss_fn(s1, t1, 0.04)
    # the first loss used the zero center
    ref1, _ = _reference_loss(s1.tolist(), t1.tolist(), [0.0] * k, ncrops, 2, 0.1, 0.04)
    assert l1.item() == pytest.approx(ref1, rel=1e-6)
    rows1 = t1.tolist()
    c1 = [0.1 * sum(r[j] for r in rows1) / len(rows1) for j in range(k)]
    assert loss_fn.center[0].tolist() == pytest.approx(c1, abs=1e-7)

    l2 = loss_fn(s2, t2, 0.05)
    ref2, _ = _reference_loss(s2.tolist(), t2.tolist(), c1, ncrops, 2, 0.1, 0.05)
    assert l2.item() == pytest.approx(ref2, rel=1e-6)
    rows2 = t2.tolist()
    c2 = [0.9 * c1[j] + 0.1 * sum(r[j] for r in rows2) / len(rows2) for j in range(k)]
    assert loss_fn.center[0].tolist() == pytest.approx(c2, abs=1e-7)
    assert loss_fn.center.shape == (1, k)
    assert "center" in loss_fn.state_dict()


def test_gradient_reaches_student_only() -> None:
    torch.manual_seed(2)
    student = torch.randn(4 * 2, 6, requires_grad=True)
    teacher = torch.randn(2 * 2, 6, requires_grad=True)
    loss = DINOLoss(6, 4)(student, teacher, 0.04)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    assert not DINOLoss(6, 4).center.requires_grad


def test_configurable_number_of_global_crops() -> None:
    torch.manual_seed(3)
    ncrops, batch, k = 5, 2, 4
    student = torch.randn(ncrops * batch, k, dtype=torch.float64)
    teacher = torch.randn(3 * batch, k, dtype=torch.float64)
    loss_fn = DINOLoss(k, ncrops, n_global_crops=3)
    expected, terms = _reference_loss(
        student.tolist(), teacher.tolist(), [0.0] * k, ncrops, 3, 0.1, 0.07
    )
    assert terms == loss_fn.n_loss_terms == 12
    assert loss_fn(student, teacher, 0.07).item() == pytest.approx(expected, rel=1e-6)


def test_low_precision_inputs_give_float32_loss() -> None:
    torch.manual_seed(4)
    student = torch.randn(4 * 3, 8)
    teacher = torch.randn(2 * 3, 8)
    full = DINOLoss(8, 4)(student, teacher, 0.04)
    half = DINOLoss(8, 4)(student.bfloat16(), teacher.bfloat16(), 0.04)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=2e-2)


def test_shape_errors_are_explained() -> None:
    loss_fn = DINOLoss(8, 4)
    with pytest.raises(ValueError, match="multiple of ncrops"):
        loss_fn(torch.randn(7, 8), torch.randn(4, 8), 0.04)
    with pytest.raises(ValueError, match="teacher rows"):
        loss_fn(torch.randn(8, 8), torch.randn(6, 8), 0.04)
    with pytest.raises(ValueError, match="out_dim"):
        loss_fn(torch.randn(8, 5), torch.randn(4, 5), 0.04)
    with pytest.raises(ValueError):
        DINOLoss(8, ncrops=1, n_global_crops=1)


def test_initial_loss_on_random_features_is_ln_k_plus_student_spread() -> None:
    """At init the loss is about ln(K), but not exactly, and not below it for unrelated crops.

    Logits are cosines between a random 256-d unit embedding and random unit prototypes, so
    they have variance ~1/256. For teacher and student crops with *independent* features the
    cross term vanishes and the loss is logsumexp(s / 0.1) ~ ln K + Var(s) / (2 * 0.1^2)
    = 11.090 + 0.195 = 11.285 (teacher temperature does not enter). Correlated crops (the same
    image) pull it below ln K; a collapsed model sits at ln K exactly.
    """
    torch.manual_seed(0)
    k, ncrops, batch, in_dim = 65536, 10, 8, 32
    head = DINOHead(in_dim, out_dim=k, hidden_dim=256)
    with torch.no_grad():
        student = head(torch.randn(ncrops * batch, in_dim))
        teacher = head(torch.randn(2 * batch, in_dim))
    loss = DINOLoss(k, ncrops)(student, teacher, 0.04).item()
    ln_k = math.log(k)
    assert ln_k == pytest.approx(11.090, abs=1e-3)
    assert ln_k < loss < ln_k + 0.3
    assert loss == pytest.approx(ln_k + 1 / (2 * 256 * 0.1**2), abs=0.06)


# --------------------------------------------------------------------------- Sinkhorn-Knopp


def _reference_sinkhorn(teacher: list[list[float]], temp: float, iters: int) -> list[list[float]]:
    """DINOv2's procedure as published, with its global scalings and no max shift."""
    n, k = len(teacher), len(teacher[0])
    q = [[math.exp(teacher[b][j] / temp) for b in range(n)] for j in range(k)]  # K x N
    total = sum(sum(r) for r in q)
    q = [[x / total for x in r] for r in q]
    for _ in range(iters):
        q = [[x / sum(r) / k for x in r] for r in q]
        col = [sum(q[j][b] for j in range(k)) for b in range(n)]
        q = [[q[j][b] / col[b] / n for b in range(n)] for j in range(k)]
    return [[q[j][b] * n for j in range(k)] for b in range(n)]


def test_sinkhorn_knopp_matches_reference_and_marginals() -> None:
    torch.manual_seed(5)
    n, k, temp = 12, 6, 0.1
    # cosine-sized logits with a pull towards prototype 0, the start of a collapse
    teacher = 0.1 * torch.randn(n, k, dtype=torch.float64)
    teacher[:, 0] += 0.2
    q = sinkhorn_knopp(teacher, temp, n_iterations=3)
    ref = _reference_sinkhorn(teacher.tolist(), temp, 3)
    assert q.shape == (n, k)
    for b in range(n):
        assert q[b].tolist() == pytest.approx(ref[b], rel=1e-5)
        assert sum(q[b].tolist()) == pytest.approx(1.0, abs=1e-6)
    # prototype marginals approach N / K = 2 (softmax gives prototype 0 about 5.7 of the 12
    # samples); three iterations get within 1 %, more get there up to float32 rounding
    target = n / k
    sm_dev = (torch.softmax(teacher / temp, dim=-1).sum(0) - target).abs().max().item()
    sk_dev = (q.sum(0) - target).abs().max().item()
    assert sm_dev > 1.0
    assert sk_dev < 0.01 * target
    q_many = sinkhorn_knopp(teacher, temp, n_iterations=200)
    assert q_many.sum(0).tolist() == pytest.approx([target] * k, rel=1e-4)


def test_sinkhorn_knopp_survives_low_temperature() -> None:
    """Unshifted exp(t / 0.04) overflows float32 for logits above ~3.5; the shift avoids it."""
    teacher = torch.tensor([[5.0, 4.0, 0.0], [0.0, 5.0, 4.9], [4.5, 0.0, 5.0]])
    q = sinkhorn_knopp(teacher, 0.04)
    assert torch.isfinite(q).all()
    assert q.sum(1).tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)


def test_loss_with_sinkhorn_knopp_uses_balanced_teacher_and_ignores_center() -> None:
    torch.manual_seed(6)
    ncrops, batch, k, temp = 4, 3, 5, 0.07
    student = torch.randn(ncrops * batch, k, dtype=torch.float64)
    teacher = torch.randn(2 * batch, k, dtype=torch.float64)
    loss_fn = DINOLoss(k, ncrops, sinkhorn_knopp=True)
    loss_fn.center.fill_(0.3)  # must be ignored
    loss = loss_fn(student, teacher, temp)
    p = _reference_sinkhorn(teacher.tolist(), temp, 3)  # over all 2B teacher rows together
    total = 0.0
    for i in range(2):
        for v in range(ncrops):
            if v != i:
                for b in range(batch):
                    ls = _log_softmax(student[v * batch + b].tolist(), 0.1)
                    total += -sum(x * y for x, y in zip(p[i * batch + b], ls)) / batch
    assert loss.item() == pytest.approx(total / 6, rel=1e-5)
    assert torch.equal(loss_fn.center, torch.full((1, k), 0.3))
