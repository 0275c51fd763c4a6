"""engine.compile: regional compilation of the backbones (ssl_container/trainer/compiling.py).

The 1x1-convolution decompositions are checked against aten's convolution and its backward; one real
inductor compile of a Container block checks the gradients against eager and that its 1x1 layers left the
convolution kernels; the recompile limit is checked with dynamo's real guards (the eager backend: what is
counted is dynamo's graphs, not inductor's code)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from ssl_container.models import container_light
from ssl_container.trainer import compiling
from ssl_container.trainer.compiling import _conv_backward, _conv_forward, compile_backbones, inductor_backend

aten = torch.ops.aten
TINY = dict(embed_dims=[16, 32, 48, 64], depths=[1, 2, 1, 1])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_1x1_convolution_as_a_matrix_multiply_matches_aten_forward_and_backward(bias, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 24, 5, 7, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(40, 24, 1, 1, generator=g, dtype=torch.float64)
    b = torch.randn(40, generator=g, dtype=torch.float64) if bias else None
    conv = (x, w, b, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)
    want = aten.convolution(*conv)
    torch.testing.assert_close(_conv_forward(*conv), want, rtol=1e-12, atol=1e-12)
    grad = torch.randn(want.shape, generator=g, dtype=torch.float64)
    back = (grad, x, w, [40] if bias else None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, bias])
    for got, ref in zip(_conv_backward(*back), aten.convolution_backward(*back)):
        if ref is None:
            assert got is None
        else:
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    # Anything but a dense 1x1, stride-1, unpadded convolution is left alone.
    depthwise = (x, torch.randn(24, 1, 3, 3, dtype=torch.float64), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 24)
    strided = (x, w, b, [2, 2], [0, 0], [1, 1], False, [0, 0], 1)
    assert _conv_forward(*depthwise) is NotImplemented and _conv_forward(*strided) is NotImplemented


def _calls(name: str, fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name == name for e in prof.events())


def test_a_compiled_block_gives_eager_gradients_and_runs_its_1x1_layers_as_matrix_multiplies():
    torch.manual_seed(0)
    block = container_light(num_classes=0, **TINY).stages[1].blocks[0].train()
    compiled = copy.deepcopy(block)
    compiled.compile(backend=inductor_backend(), dynamic=False)
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    block(x1).square().sum().backward()
    compiled(x2).square().sum().backward()  # the first call compiles
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(block.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    n_1x1 = sum(m.kernel_size == (1, 1) and m.groups == 1 for m in block.modules() if isinstance(m, torch.nn.Conv2d))
    n_conv = sum(isinstance(m, torch.nn.Conv2d) for m in block.modules())
    assert n_1x1 >= 3
    for name, run in (("aten::convolution", lambda m: m(x.clone().requires_grad_())),
                      ("aten::convolution_backward", lambda m: m(x.clone().requires_grad_()).sum().backward())):
        assert _calls(name, lambda: run(block)) == n_conv, name
        assert _calls(name, lambda: run(compiled)) == n_conv - n_1x1, name


def test_every_block_stays_compiled_across_crop_sizes_and_grad_modes(monkeypatch):
    """The student at two crop sizes with gradients and the teacher at one without: 4 stages x 3 = 12 graphs on
    the blocks' one code object, past dynamo's default limit of 8 (the limit set, 4 x 2 x 2, leaves room for a
    teacher that sees both sizes); with it, no block falls back to eager, and the second step compiles nothing."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setattr(compiling, "inductor_backend", lambda mode: "eager")
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    student = container_light(num_classes=0, **TINY).train()
    teacher = copy.deepcopy(student)
    assert compile_backbones(student, teacher, input_sizes=2) == 2 * sum(TINY["depths"])
    assert torch._dynamo.config.recompile_limit == 4 * 2 * 2
    graphs = []
    for _ in range(2):  # the second round reuses every graph
        with torch.no_grad():
            teacher(torch.randn(2, 3, 64, 64))
        (student(torch.randn(2, 3, 64, 64)).sum() + student(torch.randn(2, 3, 32, 32)).sum()).backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [4 * 3] * 2
    torch._dynamo.reset()
