"""Regional compilation of the backbones (``engine.compile``).

Each repeated block is compiled on its own, so a compile costs a few graphs per stage and crop size,
not one per block or one whole-network graph (PyTorch's advice for cold starts). Two things on top of
plain ``module.compile()``:

- **The recompile limit.** All blocks of a model share one ``forward`` code object, and dynamo keeps its
  graphs there: one per block shape, input size and grad mode. Container-Light needs 4 x 2 x 2 = 16
  (four stages, global and local crops, the student with gradients and the teacher without); past
  ``torch._dynamo.config.recompile_limit`` (8 by default) dynamo stops compiling the code object and the
  blocks left over run eager without a word. :func:`compile_backbones` raises the limit to what it needs.
- **1x1 convolutions as matrix multiplies, forward and backward.** Two thirds of Container-Light's block
  convolutions are 1x1 (72 of 108). Inductor leaves convolutions to aten as extern kernels; on a CPU a
  convolution's forward is 5 aten calls and its backward about 14 (layout conversions and buffers inside
  oneDNN's path). As a matrix multiply over the (N*H*W, C) view of the channels-last map a 1x1 layer is the
  same arithmetic in 4-5 calls each way (the matrix multiply and the checks inside it). :func:`_conv_forward`
  and :func:`_conv_backward` are decompositions handed to AOT autograd with inductor's own table.
- **Graphs for training only.** The k-NN monitor runs the compiled teacher in eval mode, at another
  resolution and batch size: :func:`eager` keeps such calls out of the graphs (and out of the limit).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
import torch._functorch.config
from torch import nn

__all__ = ["compile_backbones", "eager", "inductor_backend"]

aten = torch.ops.aten


def _is_dense_1x1(weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int], transposed: bool,
                  groups: int) -> bool:
    return (weight.dim() == 4 and tuple(weight.shape[2:]) == (1, 1) and not transposed and groups == 1
            and all(s == 1 for s in stride) and all(p == 0 for p in padding))


def _conv_forward(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
                  padding: Sequence[int], dilation: Sequence[int], transposed: bool, output_padding: Sequence[int],
                  groups: int) -> Any:
    """``aten.convolution`` of a dense 1x1, stride-1, unpadded 2-d convolution as one matrix multiply over the
    (N*H*W, C) view (the bias left to inductor's next fused kernel); every other convolution unchanged."""
    if not _is_dense_1x1(weight, stride, padding, transposed, groups):
        return NotImplemented
    n, c_in, h, w = input.shape
    c_out = weight.shape[0]
    y = torch.mm(input.permute(0, 2, 3, 1).reshape(n * h * w, c_in), weight.reshape(c_out, c_in).t())
    if bias is not None:
        y = y + bias
    return y.reshape(n, h, w, c_out).permute(0, 3, 1, 2)


def _conv_backward(grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, bias_sizes: Sequence[int] | None,
                   stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], transposed: bool,
                   output_padding: Sequence[int], groups: int, output_mask: Sequence[bool]) -> Any:
    """``aten.convolution_backward`` of a dense 1x1, stride-1, unpadded 2-d convolution as matrix multiplies
    over the (N*H*W, C) views; every other convolution goes to inductor's own decomposition (which keeps the
    op on a CPU)."""
    from torch._inductor.decomposition import convolution_backward as inductor_conv_backward

    if not _is_dense_1x1(weight, stride, padding, transposed, groups):
        return inductor_conv_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed,
                                      output_padding, groups, output_mask)
    n, c_in, h, w = input.shape
    c_out = weight.shape[0]
    g = grad_output.permute(0, 2, 3, 1).reshape(n * h * w, c_out)
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        grad_input = torch.mm(g, weight.reshape(c_out, c_in)).reshape(n, h, w, c_in).permute(0, 3, 1, 2)
    if output_mask[1]:
        x = input.permute(0, 2, 3, 1).reshape(n * h * w, c_in)
        grad_weight = torch.mm(g.t(), x).reshape(c_out, c_in, 1, 1)
    if output_mask[2]:
        grad_bias = g.sum(0)
    return grad_input, grad_weight, grad_bias


def inductor_backend(mode: str = "default") -> Callable[..., Any]:
    """Inductor at ``mode`` (its ``default`` / ``reduce-overhead`` / ``max-autotune-no-cudagraphs`` options),
    with 1x1 convolutions lowered to matrix multiplies in the forward and the backward graphs."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    patches = list_mode_options(mode)

    def backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
        table = {**select_decomp_table(), aten.convolution.default: _conv_forward,
                 aten.convolution_backward.default: _conv_backward}
        # AOT autograd's cache keys the graph before decomposition and does not see this table, so it would
        # hand back graphs compiled without it; inductor's own cache keys the decomposed graph and stays on.
        no_aot_cache = ({"enable_autograd_cache": False}
                        if hasattr(torch._functorch.config, "enable_autograd_cache") else {})
        with torch._functorch.config.patch(**no_aot_cache):
            return compile_fx(gm, example_inputs, config_patches=patches, decompositions=table)

    return backend


def compile_backbones(*models: nn.Module, mode: str = "default", input_sizes: int = 2) -> int:
    """``torch.compile`` each repeated block of each model's backbone in place (backbones without blocks
    whole), with :func:`inductor_backend`. ``nn.Module.compile`` keeps parameter names and state dicts, so
    checkpoints and the EMA are unaffected. ``input_sizes``: how many input resolutions the blocks will
    see (the global and the local crops). Returns the number of modules compiled."""
    import torch._dynamo

    backend = inductor_backend(mode)
    compiled, shapes = 0, set()
    for model in models:
        backbone = getattr(model, "backbone", model)
        blocks = [b for stage in getattr(backbone, "stages", []) for b in getattr(stage, "blocks", [])]
        blocks = blocks or list(getattr(backbone, "blocks", []))  # timm's ViT
        for module in blocks or [backbone]:
            shapes.add((type(module), tuple(tuple(p.shape) for p in module.parameters())))
            module.compile(backend=backend, dynamic=False)
            compiled += 1
    needed = len(shapes) * max(input_sizes, 1) * 2  # x 2: with and without gradients
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"  # < 2.6
    if getattr(torch._dynamo.config, limit) < needed:
        setattr(torch._dynamo.config, limit, needed)
    return compiled


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Compiled modules run their eager code inside (evaluation passes that would only add graphs)."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    if set_stance is None:
        yield
        return
    with set_stance("force_eager"):
        yield
