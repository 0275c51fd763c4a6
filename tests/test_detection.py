"""Detection transfer: the FPN backbone contract, frozen BN, padding, tiny training steps, COCOeval."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

import ssl_container  # noqa: F401
from ssl_container.models import container_light
from ssl_container.downstream.detection_backbone import (
    ContainerC4BoxHead,
    ContainerFPNBackbone,
    c4_anchor_sizes,
    container_light_fpn_backbone,
    fasterrcnn_container_light_c4,
    fasterrcnn_container_light_fpn,
    retinanet_container_light_fpn,
)

TINY = dict(embed_dims=[16, 32, 64, 128], depths=[1, 1, 1, 1])
DATA = Path(os.environ.get("SSL_CONTAINER_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "coco128"
needs_coco = pytest.mark.skipif(
    not (DATA / "annotations" / "instances_val2017.json").is_file(),
    reason=f"coco128 not found at {DATA} (set SSL_CONTAINER_DATA to the folder holding coco128/)",
)


def _randomised_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
    return model


def test_fpn_backbone_channels_strides_and_padding():
    torch.manual_seed(0)
    backbone = container_light_fpn_backbone().eval()
    assert backbone.out_channels == 256 and backbone.strides == (4, 8, 16, 32)
    x = torch.randn(1, 3, 100, 130)  # not multiples of 32: padded to 128 x 160 inside
    with torch.no_grad():
        out = backbone(x)
        padded = backbone(torch.nn.functional.pad(x, (0, 30, 0, 28)))
    assert list(out) == ["0", "1", "2", "3", "pool"]
    assert [tuple(v.shape) for v in out.values()] == [(1, 256, 32, 40), (1, 256, 16, 20), (1, 256, 8, 10),
                                                      (1, 256, 4, 5), (1, 256, 2, 3)]
    for k in out:
        assert torch.equal(out[k], padded[k])
    # The four stage outputs enter the FPN with their own widths.
    assert [b[0].in_channels for b in backbone.fpn.inner_blocks] == [64, 128, 320, 512]
    # Final norm and classifier are gone: every parameter left can get a gradient.
    assert isinstance(backbone.body.norm, nn.Identity) and isinstance(backbone.body.head, nn.Identity)


def test_batchnorm_frozen_by_default_with_the_same_statistics():
    body = _randomised_bn(container_light(num_classes=0, **TINY))
    stats = {n: (m.running_mean.clone(), m.running_var.clone(), m.weight.detach().clone())
             for n, m in body.named_modules() if isinstance(m, nn.BatchNorm2d) and not n.startswith("norm")}
    backbone = ContainerFPNBackbone(body)
    frozen = {n: m for n, m in backbone.body.named_modules() if isinstance(m, FrozenBatchNorm2d)}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert set(frozen) == set(stats) and len(frozen) == 2 * sum(TINY["depths"])
    for n, (mean, var, w) in stats.items():
        assert torch.equal(frozen[n].running_mean, mean) and torch.equal(frozen[n].running_var, var)
        assert torch.equal(frozen[n].weight, w)
    assert not any("norm1" in n or "norm2" in n for n, _ in backbone.named_parameters())
    # norm="bn" keeps trainable BatchNorm.
    bn = ContainerFPNBackbone(container_light(num_classes=0, **TINY), norm="bn")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules()) == 2 * sum(TINY["depths"])


@pytest.mark.parametrize("freeze_at, frozen_prefixes", [
    (0, []),
    (1, ["body.stages.0.patch_embed"]),
    (3, ["body.stages.0.", "body.stages.1."]),
    (5, ["body.stages."]),
])
def test_freeze_at(freeze_at, frozen_prefixes):
    backbone = ContainerFPNBackbone(container_light(num_classes=0, **TINY), freeze_at=freeze_at).train()
    for name, p in backbone.named_parameters():
        assert p.requires_grad == (not any(name.startswith(f) for f in frozen_prefixes)), name
    if freeze_at:
        assert not backbone.body.stages[0].patch_embed.training  # frozen layers stay in eval mode
    with pytest.raises(ValueError, match="freeze_at must be in 0..5"):
        ContainerFPNBackbone(container_light(num_classes=0, **TINY), freeze_at=6)


def test_detectors_pad_to_32_and_take_exported_weights(tmp_path):
    from ssl_container.export import export

    body = _randomised_bn(container_light(num_classes=0, **TINY))
    from safetensors.torch import save_file

    save_file(body.state_dict(), str(tmp_path / "bare.safetensors"))
    exp = export(tmp_path / "bare.safetensors", tmp_path / "export", model_kwargs=TINY)
    frcnn = fasterrcnn_container_light_fpn(5, exp, min_size=128, max_size=160)
    retina = retinanet_container_light_fpn(5, exp, min_size=128, max_size=160)
    for det in (frcnn, retina):
        assert det.transform.size_divisible == 32
        loaded = det.backbone.body.stages[2].blocks[0]
        assert torch.equal(loaded.mlp.fc1.weight, body.stages[2].blocks[0].mlp.fc1.weight)
        assert torch.equal(loaded.norm1.running_var, body.stages[2].blocks[0].norm1.running_var)
    # RetinaNet: P3-P5 from stages 2-4, then P6/P7 from the last stage output.
    assert [b[0].in_channels for b in retina.backbone.fpn.inner_blocks] == [32, 64, 128]
    with torch.no_grad():
        feats = retina.backbone.eval()(torch.randn(1, 3, 128, 160))
    assert list(feats) == ["0", "1", "2", "p6", "p7"]
    assert [v.shape[-1] for v in feats.values()] == [20, 10, 5, 3, 2]


def test_multi_scale_training_and_a_narrow_box_head():
    """--min-size A B C: each training batch is resized to one of them, evaluation to the last; --box-head-dim
    sets the width of the box head's two fully connected layers (and its predictor's input)."""
    torch.manual_seed(0)
    det = fasterrcnn_container_light_fpn(3, None, min_size=(64, 96, 128), max_size=400, box_head_dim=256,
                                         backbone_kwargs=TINY)
    assert det.roi_heads.box_head.fc6.out_features == 256 and det.roi_heads.box_head.fc6.in_features == 256 * 7 * 7
    assert det.roi_heads.box_predictor.cls_score.in_features == 256
    assert det.roi_heads.box_predictor.cls_score.out_features == 3  # background + 2 classes
    image = torch.rand(3, 100, 150)
    det.transform.train()
    seen = {det.transform(images=[image])[0].image_sizes[0][0] for _ in range(40)}
    assert seen == {64, 96, 128}
    det.transform.eval()
    assert det.transform(images=[image])[0].image_sizes[0] == (128, 192)


def test_c4_detector_classifies_rois_with_the_pretrained_last_stage(tmp_path):
    """fasterrcnn_c4: RPN and RoIAlign on the stride-16 map; the box head is the backbone's own last stage,
    final norm and average pool, loaded with the pretrained weights; freeze_at 5 leaves only the RPN and the
    two linear layers trainable, freeze_at 4 the last stage too."""
    from safetensors.torch import save_file

    from ssl_container.export import export

    body = _randomised_bn(container_light(num_classes=0, **TINY)).eval()
    save_file(body.state_dict(), str(tmp_path / "bare.safetensors"))
    exp = export(tmp_path / "bare.safetensors", tmp_path / "export", model_kwargs=TINY)
    det = fasterrcnn_container_light_c4(3, exp, freeze_at=5, min_size=128, max_size=200, roi_size=4)
    head = det.roi_heads.box_head
    assert isinstance(head, ContainerC4BoxHead) and head.out_channels == 128
    assert det.backbone.out_channels == 64 and det.backbone.strides == (16,) and det.transform.size_divisible == 16
    assert len(det.backbone.body.stages) == 3 and det.roi_heads.box_roi_pool.output_size == (4, 4)
    assert det.rpn.anchor_generator.sizes == (c4_anchor_sizes(200),) == ((16, 32, 64, 128),)
    trainable = {n.split(".")[0] + "." + n.split(".")[1] for n, p in det.named_parameters() if p.requires_grad}
    assert trainable == {"rpn.head", "roi_heads.box_predictor"}
    # The head is the pretrained network's ending: a RoI that is a whole image gets the image's pooled features.
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        stride16 = det.backbone(x)["0"]
        want = body.forward_head(body.forward_features(x), pre_logits=True)
        assert torch.allclose(det.eval().roi_heads.box_head(stride16), want, atol=1e-5)
    det.train()
    assert not head.training and not any(s.training for s in det.backbone.body.stages)
    images = [torch.rand(3, 100, 150), torch.rand(3, 120, 90)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 80.0, 90.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = det(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert det.roi_heads.box_predictor.cls_score.weight.grad is not None
    tuned = fasterrcnn_container_light_c4(3, exp, freeze_at=4, min_size=128, max_size=200, roi_size=4)
    assert all(p.requires_grad for p in tuned.roi_heads.box_head.parameters())
    assert not any(p.requires_grad for p in tuned.backbone.parameters())
    # --backbone-lr-mult: the pretrained layers (here the box head's last stage) get lr x mult, the new layers lr.
    from eval.detection import param_groups

    groups = param_groups(tuned, 0.05, lr=1e-3, backbone_lr_mult=0.1)
    stage = {id(p) for p in tuned.roi_heads.box_head.parameters()}
    new = {id(p) for p in tuned.roi_heads.box_predictor.parameters()} | {id(p) for p in tuned.rpn.parameters()}
    for g in groups:
        ids = {id(p) for p in g["params"]}
        assert ids <= stage and g["lr"] == pytest.approx(1e-4) or ids <= new and "lr" not in g
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in tuned.parameters())
    assert len(param_groups(tuned, 0.05)) == 2  # no multiplier: decay / no decay only
    with pytest.raises(ValueError, match="roi_size must be even"):
        fasterrcnn_container_light_c4(3, None, roi_size=5, backbone_kwargs=TINY)


def _coco(split: str, n: int, train: bool):
    from eval.detection import CocoDetection, coco_split

    images, ann = coco_split(DATA, split)
    return CocoDetection(images, ann, train=train, max_images=n)


@needs_coco
def test_dataset_boxes_and_labels_round_trip():
    ds = _coco("val2017", 3, train=False)
    assert ds.num_classes == 81 and sorted(ds.label_to_cat.values()) == ds.cat_ids
    for i, image_id in enumerate(ds.ids):
        image, target = ds[i]
        assert image.shape[0] == 3 and 0 <= image.min() and image.max() <= 1
        anns = ds.coco.imgToAnns[image_id]
        got = [[*(b[:2]), b[2] - b[0], b[3] - b[1]] for b in target["boxes"].tolist()]
        want = [a["bbox"] for a in anns]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g == pytest.approx(w, abs=1e-3)
        assert [ds.label_to_cat[c] for c in target["labels"].tolist()] == [a["category_id"] for a in anns]


@needs_coco
def test_coco_metrics_of_ground_truth_is_perfect():
    from eval.detection import METRICS, coco_metrics

    ds = _coco("val2017", 4, train=False)
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for i in ds.ids for a in ds.coco.imgToAnns[i]]
    metrics, text = coco_metrics(ds.coco, dets, ds.ids)
    assert list(metrics) == list(METRICS) and "Average Precision" in text
    assert metrics["AP"] == pytest.approx(100.0) and metrics["AP50"] == pytest.approx(100.0)
    assert coco_metrics(ds.coco, [], ds.ids)[0] == {m: 0.0 for m in METRICS}


@needs_coco
def test_a_category_subset_keeps_only_its_boxes_and_scores_only_them():
    from eval.detection import CocoDetection, coco_metrics, coco_split

    images, ann = coco_split(DATA, "val2017")
    full = CocoDetection(images, ann, train=True)
    person = CocoDetection(images, ann, train=True, categories=["person"])
    pid = person.cat_ids[0]
    assert person.num_classes == 2 and person.coco.cats[pid]["name"] == "person"
    with_person = [i for i in full.ids if any(a["category_id"] == pid for a in full.coco.imgToAnns[i])]
    assert person.ids == with_person and 0 < len(person) < len(full)  # training skips images without one
    _, target = person[0]
    n_person = sum(a["category_id"] == pid and not a.get("iscrowd", 0) for a in person.coco.imgToAnns[person.ids[0]])
    assert target["labels"].tolist() == [1] * n_person
    # Perfect person boxes: AP 100 over the subset, though every other category goes undetected.
    val = CocoDetection(images, ann, train=False, categories=["person"])
    dets = [{"image_id": a["image_id"], "category_id": pid, "bbox": a["bbox"], "score": 1.0}
            for i in val.ids for a in val.coco.imgToAnns[i] if a["category_id"] == pid]
    assert coco_metrics(val.coco, dets, val.ids, val.cat_ids)[0]["AP"] == pytest.approx(100.0)
    assert coco_metrics(val.coco, dets, val.ids)[0]["AP"] < 10
    with pytest.raises(ValueError, match="--categories persn: not a category.*person"):
        CocoDetection(images, ann, categories=["persn"])
    # --negatives: the images without a person train as background (empty targets), not skipped.
    negatives = CocoDetection(images, ann, train=True, categories=["person"], negatives=True, hflip=1.0)
    assert negatives.ids == full.coco.getImgIds() or negatives.ids == sorted(full.coco.getImgIds())
    empty = next(i for i, image_id in enumerate(negatives.ids) if image_id not in person.ids)
    _, target = negatives[empty]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


@needs_coco
@pytest.mark.parametrize("builder", [fasterrcnn_container_light_fpn, retinanet_container_light_fpn])
def test_one_training_step_on_coco128_gives_finite_losses(builder):
    from eval.detection import collate, param_groups

    torch.manual_seed(0)
    ds = _coco("train2017", 2, train=True)
    # Fewer sampled RoIs/proposals keep the Faster R-CNN step cheap on CPU; the backbone is the real one.
    small = dict(box_batch_size_per_image=32, rpn_post_nms_top_n_train=100) if builder is fasterrcnn_container_light_fpn else {}
    model = builder(ds.num_classes, min_size=128, max_size=160, **small).train()
    images, targets = collate([ds[0], ds[1]])
    # The second image as a negative (--negatives): torchvision's heads take an empty target.
    targets = (targets[0], {**targets[1], "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)})
    losses = model(list(images), list(targets))
    assert all(torch.isfinite(v) for v in losses.values()), losses
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)
    sum(losses.values()).backward()
    assert model.backbone.body.stages[0].patch_embed.proj.weight.grad is not None
    opt.step()


@needs_coco
def test_eval_detection_command_compares_initialisations(tmp_path):
    from safetensors.torch import save_file

    from eval.detection import METRICS, main
    from ssl_container.export import export

    save_file(container_light(num_classes=0, **TINY).state_dict(), str(tmp_path / "bb.safetensors"))
    weights = export(tmp_path / "bb.safetensors", tmp_path / "export", model_kwargs=TINY)
    out = tmp_path / "det"
    assert main(["--data", str(DATA), "--weights", str(weights), "--init", "dino", "random", "--arch", "retinanet",
                 "--epochs", "1", "--max-iters", "1", "--max-train-images", "2", "--max-val-images", "2",
                 "--min-size", "64", "--max-size", "96", "--vis-images", "2", "--log-every", "0",
                 "--bn-recalibration", "2",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["runs"]) == ["dino", "random"]
    for name, run in results["runs"].items():
        assert list(run["metrics"]) == list(METRICS)
        assert all(v is None or 0 <= v <= 100 for v in run["metrics"].values())
        assert run["train"]["iters"] == 1 and run["train"]["epochs"][0]["loss"] > 0
        assert (out / f"predictions_{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert isinstance(json.loads((out / f"detections_{name}.json").read_text()), list)
    assert results["runs"]["dino"]["weights"]["sha256"]
    assert results["runs"]["random"]["weights"] is None
    # Random init is the same (tiny) architecture as the weights: only the initialisation differs.
    tiny = sum(p.numel() for p in container_light(num_classes=0, **TINY).parameters())
    dino, rand = results["runs"]["dino"]["backbone"], results["runs"]["random"]["backbone"]
    assert dino == rand and dino["widths"] == TINY["embed_dims"]
    assert 0 < dino["params"] < tiny  # the detection body: final norm pruned


def _float_or_none(t):
    return None if t is None else float(t)


@needs_coco
def test_backbone_frozen_iters_trains_the_heads_first_then_the_pretrained_layers():
    """``--backbone-frozen-iters``: linear probing, then fine-tuning. The pretrained layers (here the C4 box
    head's last stage) stay bitwise at their weights while the new heads learn, then move."""
    from eval.detection import lr_factor, train

    assert [lr_factor(it, 120, 10, frozen=30) for it in (0, 29)] == [0.0, 0.0]
    assert lr_factor(30, 120, 10, frozen=30) == pytest.approx(0.001)  # its own warm-up after unfreezing
    assert lr_factor(40, 120, 10, frozen=30) == pytest.approx(1.0) == lr_factor(40, 120, 10)
    assert lr_factor(85, 120, 10, frozen=30) == pytest.approx(0.1) == lr_factor(85, 120, 10)  # the same decay
    torch.manual_seed(0)
    ds = _coco("train2017", 2, train=True)
    det = fasterrcnn_container_light_c4(ds.num_classes, None, freeze_at=4, min_size=96, max_size=128, roi_size=4,
                                        backbone_kwargs=TINY, box_batch_size_per_image=16, rpn_post_nms_top_n_train=50)
    stage = next(det.roi_heads.box_head.stage.parameters())
    head = det.roi_heads.box_predictor.cls_score.weight
    seen = []
    from torch.optim.optimizer import register_optimizer_step_post_hook

    hook = register_optimizer_step_post_hook(lambda opt, args, kwargs: seen.append(
        (stage.detach().clone(), head.detach().clone(), _float_or_none(opt.state.get(stage, {}).get("step")))))
    try:
        before = (stage.detach().clone(), head.detach().clone())
        out = train(det, ds, epochs=3, batch_size=1, lr=1e-3, warmup_iters=1, backbone_frozen_iters=2, log_every=0)
    finally:
        hook.remove()
    assert out["iters"] == 6 and len(seen) == 6
    for it, (s, h, adam_steps) in enumerate(seen):
        assert torch.equal(s, before[0]) == (it < 2), it  # frozen for exactly two iterations
        assert not torch.equal(h, before[1])  # the new layers learn from the first
        # No gradients while frozen: AdamW's moments and step count start when the layer joins.
        assert (adam_steps is None) if it < 2 else (adam_steps == it - 1), (it, adam_steps)
    assert stage.requires_grad
    with pytest.raises(ValueError, match="--backbone-frozen-iters 6 leaves nothing"):
        train(det, ds, epochs=3, batch_size=1, backbone_frozen_iters=6, log_every=0)


def test_recalibrate_batchnorm_gives_the_exact_statistics_of_the_batches():
    """Precise BN: every BatchNorm's new running mean / variance are the averages, over the batches, of its
    input's batch mean and (unbiased) variance, computed with the recalibrated layers before it; drop-path
    stays off, momenta and the train / eval mode come back."""
    from ssl_container.downstream.detection_backbone import recalibrate_batchnorm

    torch.manual_seed(0)
    body = _randomised_bn(container_light(num_classes=0, drop_path_rate=0.5, **TINY)).eval()
    batches = [torch.randn(2, 3, 64, 96), torch.randn(2, 3, 64, 96) * 2 + 1]
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, []).append(
        (i[0].mean((0, 2, 3)), i[0].var((0, 2, 3), unbiased=True))))
        for n, m in body.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert recalibrate_batchnorm(body, iter(batches)) == len(hooks) > 0
    for h in hooks:
        h.remove()
    for name, m in body.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            means, variances = zip(*seen[name])
            assert len(means) == 2
            torch.testing.assert_close(m.running_mean, torch.stack(means).mean(0), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(m.running_var, torch.stack(variances).mean(0), rtol=1e-5, atol=1e-6)
            assert m.momentum == 0.1 and not m.training
    assert not body.training
    # Drop-path stayed off: the same statistics as the same weights without drop-path.
    still = _randomised_bn(container_light(num_classes=0, drop_path_rate=0.0, **TINY))
    still.load_state_dict(body.state_dict())
    recalibrate_batchnorm(still.train(), iter(batches))
    assert still.training  # each module's mode comes back
    for (name, a), b in zip(body.named_buffers(), still.buffers()):
        if "running_" in name:
            assert torch.equal(a, b), name
    first = next(m for m in body.modules() if isinstance(m, nn.BatchNorm2d))
    kept = first.running_mean.clone()
    with pytest.raises(ValueError, match="no batches given; the statistics are left as they were"):
        recalibrate_batchnorm(body, iter([]))
    assert torch.equal(first.running_mean, kept)
