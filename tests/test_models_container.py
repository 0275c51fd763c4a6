"""Container-Light matches the released network: counts, compute, sizes, official weights, timm API."""
import re

import pytest
import torch
import torch.nn.functional as F

import ssl_container  # noqa: F401  (registers the models with timm)
from ssl_container.models import container, container_light, container_pam, convert_official_state_dict
from ssl_container.models.info import count_macs, count_parameters


def _n(module):
    return sum(p.numel() for p in module.parameters())


def test_container_light_parameter_counts_match_release():
    backbone = container_light(num_classes=0)
    assert count_parameters(backbone) == 20_120_643
    assert count_parameters(container_light()) == 20_633_643  # with the 1000-class head (513,000)
    assert [_n(s.blocks) for s in backbone.stages] == [230_976, 1_205_760, 8_312_320, 9_512_451]
    assert [_n(s.patch_embed) for s in backbone.stages] == [3_264, 33_152, 164_800, 656_896]
    assert _n(backbone.norm) == 1_024
    assert backbone.num_features == 512


def test_container_light_macs():
    backbone = container_light(num_classes=0)
    # torch.utils.flop_counter FLOPs / 2, SDPA included (3 mixed blocks x 2 x 49^2 x 512 at 224).
    assert count_macs(backbone, (224, 224)) == 3_847_194_624
    assert count_macs(backbone, (96, 96)) == 705_521_664
    assert round(count_macs(backbone, (96, 96)) / 1e9, 3) == 0.706
    # The quoted 3.848 includes the classifier (512 x 1000 MACs).
    assert round(count_macs(container_light(), (224, 224)) / 1e9, 3) == 3.848


@pytest.mark.parametrize("size", [(96, 96), (128, 128), (224, 224), (256, 320)])
def test_any_size_divisible_by_32(size):
    model = container_light(num_classes=0).eval()
    x = torch.randn(1, 3, *size)
    feats = model.forward_features(x)
    assert feats.shape == (1, 512, size[0] // 32, size[1] // 32)
    maps = model.forward_intermediates(x, intermediates_only=True)
    assert [m.shape[1] for m in maps] == [64, 128, 320, 512]
    assert [size[0] // m.shape[2] for m in maps] == [4, 8, 16, 32]
    assert model(x).shape == (1, 512)


def test_bad_size_names_the_rule():
    model = container_light(num_classes=0)
    with pytest.raises(ValueError, match=r"divisible by 32.*100x224.*96x224"):
        model(torch.randn(1, 3, 100, 224))


def test_timm_api():
    import timm

    model = timm.create_model("container_light", num_classes=0)
    assert count_parameters(model) == 20_120_643
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)
    clf = timm.create_model("container_light", num_classes=10, drop_path_rate=0.1).eval()
    x = torch.randn(2, 3, 96, 96)
    assert clf(x).shape == (2, 10)
    feats = clf.forward_features(x)
    assert clf.forward_head(feats, pre_logits=True).shape == (2, 512)
    final, inter = clf.forward_intermediates(x, indices=2)
    torch.testing.assert_close(final, feats)
    assert [t.shape[1] for t in inter] == [320, 512]
    clf.reset_classifier(5)
    assert clf(x).shape == (2, 5)
    clf.reset_classifier(0)
    assert clf(x).shape == (2, 512)
    assert clf.no_weight_decay() == {f"stages.3.blocks.{i}.aggregation.affinity.mix_logit" for i in range(3)}
    rates = [b.drop_path.drop_prob for s in clf.stages for b in s.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and len(rates) == 18
    fm = timm.create_model("container_light", features_only=True)
    outs = fm(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [64, 128, 320, 512]
    assert fm.feature_info.reduction() == [4, 8, 16, 32]


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = container_light(num_classes=0).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    model(x).sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for a, p in zip(ref, model.parameters()):
        torch.testing.assert_close(p.grad, a)


def test_container_and_pam():
    full = container(num_classes=0)
    assert count_parameters(full) == 21_921_234
    assert all(len(s.blocks) for s in full.stages)
    assert full(torch.randn(1, 3, 96, 96)).shape == (1, 512)
    pam = container_pam(num_classes=0, img_size=64)
    assert pam(torch.randn(1, 3, 64, 64)).shape == (1, 512)
    with pytest.raises(ValueError, match="fixed to 64x64"):
        pam(torch.randn(1, 3, 96, 96))


# --------------------------------------------------------------------------------------------------
# The official checkpoint layout, written out independently of the converter.
def _official_state_dict(model_with_head) -> dict:
    """Our weights under the official allenai/container names, mapped by an explicit table."""
    ours = model_with_head.state_dict()
    out = {}
    for key, value in ours.items():
        if m := re.match(r"stages\.(\d)\.patch_embed\.(.+)$", key):
            out[f"patch_embed{int(m.group(1)) + 1}.{m.group(2)}"] = value
            continue
        if m := re.match(r"stages\.(\d)\.blocks\.(\d+)\.(.+)$", key):
            s, i, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
            table = {
                "aggregation.input_proj.": "conv1.",
                "aggregation.output_proj.": "conv2.",
                "aggregation.affinity.conv.": "attn.",  # the official misnomer in conv blocks
                "aggregation.affinity.static_affinity.conv.": "conv.",
                "aggregation.affinity.mix_logit": "sa_weight",
            }
            for ours_prefix, theirs in table.items():
                if rest.startswith(ours_prefix):
                    rest = theirs + rest[len(ours_prefix):]
                    break
            out[f"blocks{s}.{i}.{rest}"] = value
            continue
        out[key] = value
    return out


def _reference_forward(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """Released Container-Light forward in eval mode, straight from the official state_dict."""

    def bn(t, p):
        return F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"], False, 0.0, 1e-5)

    def conv(t, p, groups=1, padding=0, stride=1):
        return F.conv2d(t, sd[p + ".weight"], sd[p + ".bias"], stride=stride, padding=padding, groups=groups)

    for s, (patch, dim) in enumerate(zip((4, 2, 2, 2), (64, 128, 320, 512)), start=1):
        x = conv(x, f"patch_embed{s}.proj", stride=patch)
        b, c, h, w = x.shape
        t = F.layer_norm(x.flatten(2).transpose(1, 2), (c,), sd[f"patch_embed{s}.norm.weight"], sd[f"patch_embed{s}.norm.bias"], 1e-5)
        x = t.reshape(b, h, w, c).permute(0, 3, 1, 2)
        i = 0
        while f"blocks{s}.{i}.pos_embed.weight" in sd:
            p = f"blocks{s}.{i}"
            x = x + conv(x, p + ".pos_embed", groups=c, padding=1)
            if p + ".sa_weight" in sd:
                residual = x
                qkv = conv(bn(x, p + ".norm1"), p + ".conv1")
                conv_out = conv(qkv[:, 2 * c :], p + ".conv", groups=c, padding=2)
                heads = 16
                t = qkv.flatten(2).transpose(1, 2).reshape(b, h * w, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
                q, k, v = t[0], t[1], t[2]
                attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(-1)
                sa = (attn @ v).transpose(1, 2).reshape(b, h * w, c).reshape(b, h, w, c).permute(0, 3, 1, 2)
                g = torch.sigmoid(sd[p + ".sa_weight"])
                x = residual + conv(g * sa + (1 - g) * conv_out, p + ".conv2")
            else:
                y = conv(bn(x, p + ".norm1"), p + ".conv1")
                y = conv(y, p + ".attn", groups=c, padding=2)
                x = x + conv(y, p + ".conv2")
            y = conv(F.gelu(conv(bn(x, p + ".norm2"), p + ".mlp.fc1")), p + ".mlp.fc2")
            x = x + y
            i += 1
    x = bn(x, "norm").mean(dim=(2, 3))
    return F.linear(x, sd["head.weight"], sd["head.bias"])


def _randomised_model():
    torch.manual_seed(1)
    model = container_light().double()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            else:
                t.copy_(torch.randn_like(t) * 0.05)
    return model.eval()


def test_official_checkpoint_converts_and_loads_strictly():
    source = _randomised_model()
    official = _official_state_dict(source)
    assert len(official) == 422  # the 420 backbone entries listed in container.md + head.weight/bias
    assert sum(not k.startswith("head.") for k in official) == 420
    assert "blocks1.0.attn.weight" in official and "blocks4.2.conv.weight" in official
    assert "blocks4.0.sa_weight" in official

    fresh = container_light().double().eval()
    fresh.load_state_dict(convert_official_state_dict(official), strict=True)
    x = torch.randn(2, 3, 96, 128, dtype=torch.float64)
    with torch.no_grad():
        ours = fresh(x)
        torch.testing.assert_close(ours, source(x), rtol=0, atol=0)
        # And both equal the released architecture computed straight from the official weights.
        torch.testing.assert_close(ours, _reference_forward(official, x), rtol=1e-9, atol=1e-9)


def test_converter_rejects_foreign_keys():
    with pytest.raises(KeyError, match="blocks1.0.bogus"):
        convert_official_state_dict({"blocks1.0.bogus.weight": torch.zeros(1)})


def test_timm_pretrained_from_local_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    source = _randomised_model().float()
    path = tmp_path / "official.safetensors"
    save_file({k: v.contiguous() for k, v in _official_state_dict(source).items()}, str(path))
    model = timm.create_model("container_light", pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(path)))
    for name, t in model.state_dict().items():
        torch.testing.assert_close(t, source.state_dict()[name])


def test_narrow_member_is_container_light_at_a_quarter_of_the_widths():
    import timm

    from ssl_container.models import container_light_narrow

    narrow, full = container_light_narrow(num_classes=0), container_light(num_classes=0)
    # The same blocks, in the same places: module types and names match one for one.
    assert [(n, type(m)) for n, m in narrow.named_modules()] == [(n, type(m)) for n, m in full.named_modules()]
    assert narrow.embed_dims == tuple(d // 4 for d in full.embed_dims) == (16, 32, 80, 128)
    assert narrow.stage_affinities == full.stage_affinities
    assert count_parameters(narrow) == 1_302_291
    assert count_macs(narrow, (224, 224)) == 253_714_944
    assert narrow.num_features == 128
    assert count_parameters(timm.create_model("container_light_narrow", num_classes=0)) == 1_302_291


@pytest.mark.parametrize("name", ["container_light", "vit_tiny_patch16_224"])
def test_the_teacher_copy_loses_stochastic_depth_in_ours_and_timms_blocks(name):
    """DINO's teacher has no stochastic depth; the trainer finds the DropPath modules by type, ours
    (timm's attribute names) and timm's alike."""
    import timm

    from ssl_container.methods.dino import make_teacher

    student = timm.create_model(name, num_classes=0, drop_path_rate=0.2)
    teacher = make_teacher(student)
    rates = lambda m: [x.drop_prob for x in m.modules() if hasattr(x, "drop_prob")]  # noqa: E731
    assert max(rates(student)) == pytest.approx(0.2) and len(rates(teacher)) == len(rates(student)) > 4
    assert set(rates(teacher)) == {0.0}
