"""A created model is stock PyTorch: ONNX export, torch.export and the standard FLOP counter work on it."""
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ssl_container.models import create_model


def _plain(model: nn.Module) -> bool:
    return all(type(m) is nn.Conv2d for m in model.modules() if isinstance(m, nn.Conv2d))


def test_standard_flop_counter_needs_no_custom_formulas():
    # container.md: Container-Light 3.85 GMACs at 224 px, counted by PyTorch's own FlopCounterMode
    model = create_model("container_light", num_classes=0).eval()
    assert _plain(model)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 224, 224))
    assert round(counter.get_total_flops() / 2e9, 2) == 3.85


def test_onnx_export_runs_in_onnxruntime_like_pytorch(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in the dev extras: pip install -e .[dev]")
    torch.manual_seed(0)
    model = create_model("container_light", num_classes=0).eval()
    x = torch.randn(2, 3, 224, 224)
    path = tmp_path / "container_light.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["images"], output_names=["features"],
                      dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x3 = torch.randn(3, 3, 224, 224)  # another batch size: the batch axis is dynamic
    got = session.run(None, {"images": x3.numpy()})[0]
    with torch.no_grad():
        want = model(x3).numpy()
    assert got.shape == (3, model.num_features) == (3, 512)
    assert abs(got - want).max() < 1e-4


def test_torch_export_traces_plain_aten_ops():
    model = create_model("container_light_narrow", num_classes=0).eval()
    program = torch.export.export(model, (torch.randn(1, 3, 64, 64),))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("conv2d" in t for t in targets)
    assert not any("mkldnn" in t for t in targets)
