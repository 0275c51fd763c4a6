"""Faster float32 CPU kernels for Container's 1x1 and k x k depthwise convolutions, applied from outside.

Models are stock PyTorch (``nn.Conv2d`` throughout): ONNX export, ``torch.export``, FLOP counters and
``torch.jit.trace`` see ordinary convolutions. The trainer calls :func:`use_fast_cpu_kernels` on the
student when it trains in float32 on a CPU, the one place where these kernels pay, as it applies
SyncBatchNorm or DeepSpeed. It swaps the class of each eligible ``nn.Conv2d`` for a subclass with the
same parameters, state-dict keys and ``isinstance`` checks; :func:`use_plain_convs` swaps them back.
On any device but the CPU, for any dtype but float32, under autocast, or with oneDNN disabled the
subclasses run ``nn.Conv2d``'s own forward. On a float32 CPU input they compute the same function and
the same gradients (tests compare both against ``nn.Conv2d``) with kernels PyTorch does not pick:

* **1x1 (``FastPointwiseConv``)**, the channel MLPs and the context-aggregation projections, 96 % of
  Container-Light's multiply-adds. PyTorch chooses by an old rule ("for 1x1 filters THNN is faster
  when single-threaded"): with one thread and fewer than 16 images it runs im2col + MKL GEMM,
  otherwise oneDNN. On AVX-512 CPUs oneDNN's kernel on channels_last maps is the faster one, also
  for the 8-image global-crop batches of a 4-image DINO step (``benchmarks/conv_kernels.py``). The
  forward therefore calls oneDNN directly, and so does the input gradient of large maps, which is
  the forward convolution of the output gradient with the transposed weight (oneDNN's forward kernel
  is faster than its backward-data one there); the weight gradient is PyTorch's own.
* **k x k depthwise, k > 3 (``FastDepthwiseConv``)**, the static affinity (5x5). oneDNN's weight
  gradient for a 5x5 depthwise kernel runs 15-25x slower than its forward, while its 3x3 one is
  fast. A k x k weight gradient is a set of k*k correlations of the (padded) input with the output
  gradient, so it is assembled from 3x3 tiles of correlations, each a 3x3 depthwise weight gradient
  on a shifted window of the input (four tiles, overlapping, for 5x5). The input gradient is the
  depthwise convolution of the output gradient with the flipped kernel, and the bias gradient a sum.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["FastPointwiseConv", "FastDepthwiseConv", "use_fast_cpu_kernels", "use_plain_convs"]


def _fast_path(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and not torch.is_autocast_enabled("cpu")
    )


_ONE = [1, 1]
_ZERO = [0, 0]
# Below this many positions (images x height x width) a 1x1 input gradient through oneDNN's forward
# kernel no longer pays (benchmarks/conv_kernels.py: it loses at 32 x 6 x 6, wins from 32 x 12 x 12).
_SEPARATE_BACKWARD_MIN_POSITIONS = 4096


def _onednn_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int = 0,
                 groups: int = 1) -> torch.Tensor:
    return torch.ops.aten.mkldnn_convolution(x, weight, bias, [padding, padding], _ONE, _ONE, groups)


def _weight_grad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, padding: int, groups: int) -> torch.Tensor:
    """PyTorch's convolution weight gradient (whatever kernel it picks), stride 1."""
    return torch.ops.aten.convolution_backward(grad, x, weight, None, _ONE, [padding, padding], _ONE, False, _ZERO,
                                               groups, [False, True, False])[1]


class _PointwiseFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_conv(x, weight, bias)

    @staticmethod
    @once_differentiable  # double backward is neither needed by DINO nor tested here: refuse it clearly
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        want_dx, want_dw, want_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        if grad.numel() // grad.shape[1] < _SEPARATE_BACKWARD_MIN_POSITIONS:
            # Small maps: one call for all three gradients beats three (oneDNN shares its reorders).
            return torch.ops.aten.convolution_backward(grad, x, weight, [weight.shape[0]] if want_db else None, _ONE, _ZERO,
                                                       _ONE, False, _ZERO, 1, [want_dx, want_dw, want_db])
        dx = dw = db = None
        if want_dx:
            w_t = weight.flatten(1).t().contiguous().view(weight.shape[1], weight.shape[0], 1, 1)
            dx = _onednn_conv(grad, w_t, None)
        if want_dw:
            dw = _weight_grad(grad, x, weight, 0, 1)
        if want_db:
            db = grad.sum((0, 2, 3))
        return dx, dw, db


def _tile_offsets(k: int) -> list[int]:
    """Start rows (and columns) of 3-wide tiles covering 0..k-1: [0, 2] for 5, [0, 3, 4] for 7."""
    return sorted(set(range(0, k - 2, 3)) | {k - 3})


def _depthwise_weight_grad(grad: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """d(loss)/d(weight) of a k x k 'same' depthwise convolution from 3x3 tiles (module docstring).

    Tile (a, b) holds sum_{h,w} x_pad[h + a + i, w + b + j] * grad[h, w] for i, j < 3: the 3x3 weight
    gradient of an unpadded convolution over the window of x_pad starting at (a, b)."""
    _, c, h, w = x.shape
    p = k // 2
    x_pad = F.pad(x, (p, p, p, p))
    probe = x.new_zeros(c, 1, 3, 3)  # only its shape matters to the weight gradient
    out = x.new_empty(c, 1, k, k)
    offsets = _tile_offsets(k)
    for a in offsets:
        for b in offsets:
            window = x_pad[:, :, a:a + h + 2, b:b + w + 2]
            out[:, :, a:a + 3, b:b + 3] = _weight_grad(grad, window, probe, 0, c)
    return out


class _DepthwiseFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_conv(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])

    @staticmethod
    @once_differentiable  # double backward is neither needed by DINO nor tested here: refuse it clearly
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        k, c = weight.shape[-1], x.shape[1]
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _onednn_conv(grad, weight.flip(-1, -2).contiguous(), None, padding=k // 2, groups=c)
        if ctx.needs_input_grad[1]:
            dw = _depthwise_weight_grad(grad, x, k)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = grad.sum((0, 2, 3))
        return dx, dw, db


class FastPointwiseConv(nn.Conv2d):
    """An ``nn.Conv2d`` 1x1 (stride 1, no padding, one group); float32 CPU forward and input gradient on oneDNN."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if _fast_path(input, weight):
            return _PointwiseFn.apply(input, weight, bias)
        return super()._conv_forward(input, weight, bias)


class FastDepthwiseConv(nn.Conv2d):
    """An ``nn.Conv2d`` k x k depthwise ('same' padding, odd k > 3, stride 1); float32 CPU weight gradient
    from 3x3 tiles (oneDNN's own 3x3 path is already fast)."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if _fast_path(input, weight):
            return _DepthwiseFn.apply(input, weight, bias)
        return super()._conv_forward(input, weight, bias)


def _plain_geometry(m: nn.Conv2d) -> bool:
    return (m.stride == (1, 1) and m.dilation == (1, 1) and m.padding_mode == "zeros"
            and m.kernel_size[0] == m.kernel_size[1])


def _fast_class(m: nn.Module) -> type | None:
    if type(m) is not nn.Conv2d or not _plain_geometry(m):
        return None
    k = m.kernel_size[0]
    if k == 1 and m.groups == 1 and m.padding == (0, 0):
        return FastPointwiseConv
    if (k > 3 and k % 2 == 1 and m.groups == m.in_channels == m.out_channels
            and m.padding == (k // 2, k // 2)):
        return FastDepthwiseConv
    return None


def use_fast_cpu_kernels(model: nn.Module) -> int:
    """Give every eligible ``nn.Conv2d`` of ``model`` the fast float32 CPU kernels, in place (same
    parameters and state dict; a deep copy keeps them). Returns how many convolutions changed."""
    changed = 0
    for m in model.modules():
        cls = _fast_class(m)
        if cls is not None:
            m.__class__ = cls
            changed += 1
    return changed


def use_plain_convs(model: nn.Module) -> int:
    """Undo :func:`use_fast_cpu_kernels`: every convolution is a stock ``nn.Conv2d`` again."""
    changed = 0
    for m in model.modules():
        if type(m) in (FastPointwiseConv, FastDepthwiseConv):
            m.__class__ = nn.Conv2d
            changed += 1
    return changed
