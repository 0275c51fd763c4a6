"""cpu_kernels: faster float32 CPU kernels for plain nn.Conv2d 1x1 / depthwise layers, same maths."""
import pytest
import torch
from torch import nn

from ssl_container.utils.cpu_kernels import (FastDepthwiseConv, FastPointwiseConv, _depthwise_weight_grad, _tile_offsets,
                                       use_fast_cpu_kernels, use_plain_convs)
from ssl_container.models import container_light


def PointwiseConv(cin, cout, bias=True):
    conv = nn.Conv2d(cin, cout, 1, bias=bias)
    assert use_fast_cpu_kernels(conv) == 1
    return conv


def DepthwiseConv(dim, k, bias=True):
    conv = nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim, bias=bias)
    assert use_fast_cpu_kernels(conv) == 1
    return conv


def _reference_and_fast(fast, dtype=torch.float32):
    """An nn.Conv2d with the same geometry and weights as ``fast``."""
    torch.manual_seed(0)
    ref = nn.Conv2d(fast.in_channels, fast.out_channels, fast.kernel_size, padding=fast.padding,
                    groups=fast.groups, bias=fast.bias is not None)
    fast.load_state_dict(ref.state_dict())
    return ref.to(dtype), fast.to(dtype)


def _grads(module, x, g):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(g)
    return y, [x.grad, module.weight.grad] + ([module.bias.grad] if module.bias is not None else [])


CASES = [
    (lambda: PointwiseConv(24, 40), "_PointwiseFnBackward", 40),
    (lambda: PointwiseConv(24, 40, bias=False), "_PointwiseFnBackward", 40),
    (lambda: DepthwiseConv(24, 5), "_DepthwiseFnBackward", 24),
    (lambda: DepthwiseConv(24, 7, bias=False), "_DepthwiseFnBackward", 24),
]


@pytest.mark.parametrize("make, backward, out_channels", CASES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
# below and above PyTorch's 16-image switch to oneDNN, and below and above 4096 positions (the
# 1x1 input gradient's switch to oneDNN's forward kernel)
@pytest.mark.parametrize("batch, h, w", [(3, 9, 7), (20, 9, 7), (3, 40, 36), (20, 16, 16)])
def test_fp32_cpu_kernels_match_conv2d(make, backward, out_channels, memory_format, batch, h, w):
    ref, fast = _reference_and_fast(make())
    torch.manual_seed(1)
    x = torch.randn(batch, 24, h, w).contiguous(memory_format=memory_format)
    g = torch.randn(batch, out_channels, h, w).contiguous(memory_format=memory_format)
    y_ref, grads_ref = _grads(ref, x, g)
    y, grads = _grads(fast, x, g)
    assert y.grad_fn.name() == backward  # the fast kernels ran
    assert y.is_contiguous(memory_format=memory_format)  # channels_last stays channels_last
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, grads_ref, strict=True):
        # a weight gradient sums up to 20 x 40 x 36 float32 products (|sum| ~ 100): 5e-4 is round-off
        torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-4)


def test_depthwise_weight_gradient_from_3x3_tiles_is_exact_in_fp64():
    torch.manual_seed(1)
    for k in (3, 5, 7, 9):
        x = torch.randn(2, 6, 11, 8, dtype=torch.float64)
        g = torch.randn(2, 6, 11, 8, dtype=torch.float64)
        w = torch.randn(6, 1, k, k, dtype=torch.float64, requires_grad=True)
        torch.nn.functional.conv2d(x, w, None, 1, k // 2, 1, 6).backward(g)
        torch.testing.assert_close(_depthwise_weight_grad(g, x, k), w.grad, rtol=1e-12, atol=1e-12)
    assert _tile_offsets(3) == [0] and _tile_offsets(5) == [0, 2] and _tile_offsets(7) == [0, 3, 4]


@pytest.mark.parametrize("make", [lambda: PointwiseConv(24, 40), lambda: DepthwiseConv(24, 5)])
def test_other_dtypes_onednn_off_and_autocast_take_the_ordinary_path(make):
    ref, fast = _reference_and_fast(make(), torch.float64)
    x = torch.randn(2, 24, 6, 6, dtype=torch.float64)
    g = torch.randn_like(ref(x))
    y_ref, grads_ref = _grads(ref, x, g)
    y, grads = _grads(fast, x, g)
    assert y.grad_fn.name() == "ConvolutionBackward0"
    assert torch.equal(y, y_ref) and all(torch.equal(a, b) for a, b in zip(grads, grads_ref))
    fast.float()
    x = torch.randn(2, 24, 6, 6, requires_grad=True)
    with torch.backends.mkldnn.flags(enabled=False):
        assert fast(x).grad_fn.name() == "ConvolutionBackward0"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast(x).dtype == torch.bfloat16  # autocast's conv2d, not the fp32 kernels


def test_pointwise_is_a_matrix_product_over_channels():
    _, fast = _reference_and_fast(PointwiseConv(24, 40))
    x = torch.randn(2, 24, 5, 5)
    expect = torch.einsum("oc,bchw->bohw", fast.weight.detach().flatten(1), x) + fast.bias.detach().view(1, -1, 1, 1)
    torch.testing.assert_close(fast(x), expect, rtol=1e-5, atol=1e-5)


def test_they_are_conv2ds_with_the_same_state_dict():
    fast = PointwiseConv(4, 8, bias=False)
    assert isinstance(fast, nn.Conv2d) and type(fast) is FastPointwiseConv and fast.kernel_size == (1, 1)
    assert list(fast.state_dict()) == ["weight"]
    dw = DepthwiseConv(8, 5)
    assert type(dw) is FastDepthwiseConv and (dw.groups, dw.padding, dw.weight.shape) == (8, (2, 2), (8, 1, 5, 5))


@pytest.mark.parametrize("conv", [
    nn.Conv2d(8, 8, 3, padding=1, groups=8),  # 3x3 depthwise: oneDNN's own path is fast
    nn.Conv2d(8, 16, 1, stride=2),
    nn.Conv2d(8, 16, 1, padding=1),
    nn.Conv2d(8, 8, 5, padding=2, groups=4),
    nn.Conv2d(8, 8, 5, padding=1, groups=8),
    nn.Conv2d(8, 16, 3, padding=1),
])
def test_other_convolutions_are_left_alone(conv):
    assert use_fast_cpu_kernels(conv) == 0 and type(conv) is nn.Conv2d


def test_container_light_is_plain_until_the_kernels_are_applied():
    import copy

    model = container_light(num_classes=0)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(type(m) is nn.Conv2d for m in convs)  # a created model is stock PyTorch
    ones = [m for m in convs if m.kernel_size == (1, 1)]
    depthwise = [m for m in convs if m.groups > 1]
    # per block: input_proj, output_proj, fc1, fc2 and pos_embed (3x3), static affinity (5x5); 18 blocks
    assert len(ones) == 4 * 18 and len(depthwise) == 2 * 18
    assert sorted({m.kernel_size[0] for m in depthwise}) == [3, 5]
    keys = list(model.state_dict())
    assert use_fast_cpu_kernels(model) == 4 * 18 + 18
    assert all(type(m) is FastPointwiseConv for m in ones)
    assert [type(m) for m in depthwise if m.kernel_size == (5, 5)] == [FastDepthwiseConv] * 18
    assert list(model.state_dict()) == keys
    copied = copy.deepcopy(model)  # the teacher is a deep copy of the student: it keeps the kernels
    assert sum(type(m) is FastPointwiseConv for m in copied.modules()) == 4 * 18
    assert use_plain_convs(model) == 4 * 18 + 18
    assert all(type(m) is nn.Conv2d for m in model.modules() if isinstance(m, nn.Conv2d))
