"""The one k-NN protocol behind the demo and benchmarks/learning.py: raw-pixel floor, every image used."""
import numpy as np
import pytest
import torch
from torch import nn

from eval.protocol import EvalSplit, RawPixels, embed, floors, knn_eval


def _split(n_per_class, seed, size=8):
    g = torch.Generator().manual_seed(seed)
    # class 0: a bright left half, class 1: a bright right half, plus noise
    images, labels = [], []
    for c in (0, 1):
        base = torch.zeros(3, size, size)
        base[:, :, : size // 2] = 1.0 if c == 0 else 0.0
        base[:, :, size // 2:] = 1.0 if c == 1 else 0.0
        images.append(base + 0.3 * torch.randn(n_per_class, 3, size, size, generator=g))
        labels += [c] * n_per_class
    return EvalSplit(f"toy{seed}", torch.cat(images), np.array(labels), size)


def test_raw_pixels_are_the_flattened_crop():
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(RawPixels()(x), x.reshape(2, 48))
    assert embed(RawPixels(), _split(3, 0)).shape == (6, 3 * 8 * 8)


def test_knn_eval_uses_every_held_out_image_and_separable_pixels_score_100():
    ref, held = _split(30, 0), _split(17, 1)
    r = knn_eval(RawPixels(), ref, held)
    assert r["num_held_out"] == 34 and r["num_reference"] == 60
    assert r["top1"] == pytest.approx(100.0)


def test_floors_and_a_blind_model():
    ref, held = _split(30, 0), _split(20, 1)

    class Blind(nn.Module):  # the same feature for every image: k-NN can only guess
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return self.w.expand(x.shape[0], 4) + 0 * x.flatten(1)[:, :4]

    out = floors(ref, held, [Blind()])
    assert set(out) == {"raw_pixels", "random_init"}
    assert out["raw_pixels"]["top1"] == pytest.approx(100.0)
    assert out["random_init"]["top1"] <= 50.0 + 1e-6  # ties break to one class: half of a balanced split


def test_resolutions_must_match():
    a, b = _split(2, 0, size=8), _split(2, 1, size=16)
    with pytest.raises(ValueError, match="resolution"):
        knn_eval(RawPixels(), a, b)


def test_command_line_rows_for_an_export(tmp_path, capsys):
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from eval.protocol import main
    from ssl_container.export import export
    from ssl_container.models import create_model

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette"
    if not (data / "dataset.json").is_file():
        pytest.skip("needs ../shared/data/imagenette")
    torch.manual_seed(0)
    model = create_model("container_light_narrow", num_classes=0, depths=(1, 1, 1, 1))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    weights = export(tmp_path / "w.safetensors", tmp_path / "export", model_name="container_light_narrow",
                     model_kwargs={"depths": [1, 1, 1, 1]})
    main([str(weights), "--data", str(data), "--resolution", "32"])
    rows = json.loads(capsys.readouterr().out)
    assert set(rows) >= {"raw_pixels", "random_init", "backbone"}
    assert rows["backbone"]["num_held_out"] == 3925 and rows["backbone"]["num_reference"] == 9469
