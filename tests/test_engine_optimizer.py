"""The trainer's optimizers: fused kernels on CPU too, and the textbook update to the number."""
import pytest
import torch

from ssl_container.config import load_config
from ssl_container.trainer.engine import build_optimizer


def _param(values, grad):
    p = torch.nn.Parameter(torch.tensor(values))
    p.grad = torch.tensor(grad)
    return p


def test_adamw_is_fused_on_cpu_and_takes_the_adamw_step():
    cfg = load_config(None, ["schedule.lr=0.1", "optim.betas=[0.9,0.999]"])
    decayed, plain = _param([1.0, -2.0, 0.5], [0.3, -0.2, 4.0]), _param([3.0], [-1.5])
    opt = build_optimizer(cfg.optim, [{"params": [decayed], "weight_decay": 0.5}, {"params": [plain], "weight_decay": 0.0}], cfg.schedule.lr)
    assert all(group["fused"] for group in opt.param_groups)
    opt.step()
    # Step 1 after bias correction: m_hat = g, v_hat = g^2, so p <- p (1 - lr wd) - lr g / (|g| + eps).
    lr, eps = 0.1, 1e-8
    expect = [p * (1 - lr * 0.5) - lr * g / (abs(g) + eps) for p, g in zip([1.0, -2.0, 0.5], [0.3, -0.2, 4.0])]
    assert decayed.detach().tolist() == pytest.approx(expect, rel=1e-6)
    assert plain.item() == pytest.approx(3.0 + lr * 1.5 / (1.5 + eps), rel=1e-6)


def test_sgd_is_fused_on_cpu_and_takes_the_momentum_step():
    cfg = load_config(None, ["optim.optimizer=sgd", "schedule.lr=0.1", "optim.momentum=0.9"])
    p = _param([1.0, -2.0], [0.5, 0.25])
    opt = build_optimizer(cfg.optim, [{"params": [p], "weight_decay": 0.1}], cfg.schedule.lr)
    assert opt.param_groups[0]["fused"]
    opt.step()  # first step: buffer = g + wd p
    d1 = [0.5 + 0.1 * 1.0, 0.25 + 0.1 * -2.0]
    p1 = [1.0 - 0.1 * d1[0], -2.0 - 0.1 * d1[1]]
    assert p.detach().tolist() == pytest.approx(p1, rel=1e-6)
    p.grad = torch.tensor([0.5, 0.25])
    opt.step()  # buffer = 0.9 buffer + (g + wd p)
    d2 = [0.9 * d1[i] + [0.5, 0.25][i] + 0.1 * p1[i] for i in range(2)]
    assert p.detach().tolist() == pytest.approx([p1[i] - 0.1 * d2[i] for i in range(2)], rel=1e-6)
