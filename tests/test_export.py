"""Export: every accepted source, strict bit-identical round trips, timm loading, refusals."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ssl_container  # noqa: F401  (registers the models with timm)
from ssl_container.export import CheckpointRefused, export, load_backbone, read_checkpoint
from ssl_container.models import container_light

# A small Container-Light (same block types, fewer/narrower layers) keeps the tests fast and checks
# that architecture arguments travel through meta.json.
TINY = dict(embed_dims=[16, 32, 64, 128], depths=[1, 1, 1, 2])
HEAD = dict(in_dim=128, out_dim=32, hidden_dim=24, bottleneck_dim=8, nlayers=3, norm_last_layer=True, use_bn=False)


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-default values everywhere (BN statistics included), so a missed tensor cannot go unseen."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(seed + 7)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)
    return model


def _head_state(seed: int) -> dict[str, torch.Tensor]:
    """A DINO-head-like state dict (DINOHead's key names) made of plain tensors."""
    g = torch.Generator().manual_seed(seed)
    h, b, d = HEAD["hidden_dim"], HEAD["bottleneck_dim"], HEAD["in_dim"]
    shapes = {"mlp.0.weight": (h, d), "mlp.0.bias": (h,), "mlp.2.weight": (h, h), "mlp.2.bias": (h,),
              "mlp.4.weight": (b, h), "mlp.4.bias": (b,),
              "last_layer.parametrizations.weight.original0": (HEAD["out_dim"], 1),
              "last_layer.parametrizations.weight.original1": (HEAD["out_dim"], b)}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def make_run(root: Path, kwargs=TINY, step: int = 10, with_latest: bool = True, networks=("teacher", "student")) -> dict:
    """A run folder as the trainer writes it, with distinct teacher and student weights."""
    run = root / "run"
    step_dir = run / "checkpoints" / f"step_{step:08d}"
    step_dir.mkdir(parents=True)
    (run / "config.yaml").write_text(
        "model:\n  name: container_light\n  kwargs:\n"
        + "".join(f"    {k}: {list(v)}\n" for k, v in kwargs.items()) + "schedule:\n  lr: 0.0005\n"
    )
    nets = {}
    for i, which in enumerate(networks):
        backbone = _randomise(container_light(num_classes=0, **kwargs), seed=i)
        head = _head_state(seed=10 + i)
        state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
        state.update({f"head.{k}": v for k, v in head.items()})
        save_file({k: v.contiguous() for k, v in state.items()}, str(step_dir / f"{which}.safetensors"))
        nets[which] = (backbone, head)
    meta = {"step": step, "epoch": 1, "model": {"name": "container_light", "kwargs": {**kwargs, "num_classes": 0}},
            "head": HEAD, "config_sha256": "ab" * 32, "eval": {"knn_top1": 0.42}}
    (step_dir / "meta.json").write_text(json.dumps(meta))
    if with_latest:
        (run / "checkpoints" / "latest").write_text(step_dir.name + "\n")
    return dict(run=run, step_dir=step_dir, nets=nets, meta=meta)


class _Evil:
    """A pickle that would create a file if it were ever unpickled with weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _assert_same_state(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(expected)
    for k, v in expected.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k


# ------------------------------------------------------------------------------------------------


def test_run_folder_round_trip_is_strict_and_bit_identical(tmp_path):
    r = make_run(tmp_path)
    # DeepSpeed's own files sit in the step folder too; they must never be unpickled.
    marker = tmp_path / "unpickled"
    torch.save({"evil": _Evil(marker)}, r["step_dir"] / "mp_rank_00_model_states.pt")

    out = export(r["run"], tmp_path / "export")
    assert not marker.exists()
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "backbone.safetensors", "config.json", "meta.json", "model.safetensors"]  # no temp files left
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "ssl_container.export/1"
    assert meta["model"] == {"name": "container_light", "kwargs": TINY, "num_features": 128}
    assert (meta["which"], meta["step"], meta["epoch"]) == ("teacher", 10, 1)
    assert meta["config_sha256"] == "ab" * 32 and meta["eval"] == {"knn_top1": 0.42}
    assert meta["source"]["kind"] == "run" and meta["source"]["path"] == str(r["step_dir"].resolve())
    assert meta["weights"]["sha256"] == hashlib.sha256((out / "backbone.safetensors").read_bytes()).hexdigest()
    assert meta["dino_head"] is None

    teacher = r["nets"]["teacher"][0].state_dict()
    saved = load_file(str(out / "backbone.safetensors"))
    assert set(saved) == set(teacher) and all(torch.equal(saved[k], v) for k, v in teacher.items())
    _assert_same_state(load_backbone(out), teacher)  # architecture read from meta.json
    _assert_same_state(load_backbone(r["run"]), teacher)
    _assert_same_state(load_backbone(r["run"], "student"), r["nets"]["student"][0].state_dict())


def test_export_student_with_head_and_extra_eval(tmp_path):
    r = make_run(tmp_path)
    out = export(r["step_dir"], tmp_path / "export", "student", include_head=True, eval_results={"linear_top1": 0.5})
    meta = json.loads((out / "meta.json").read_text())
    assert meta["which"] == "student" and meta["source"]["kind"] == "step"
    assert meta["eval"] == {"knn_top1": 0.42, "linear_top1": 0.5}
    assert meta["dino_head"]["config"] == HEAD
    head = load_file(str(out / "dino_head.safetensors"))
    expected = r["nets"]["student"][1]
    assert set(head) == set(expected) and all(torch.equal(head[k], v) for k, v in expected.items())
    assert meta["dino_head"]["sha256"] == hashlib.sha256((out / "dino_head.safetensors").read_bytes()).hexdigest()
    # An export is itself a source; re-exporting keeps the weights and the provenance.
    again = export(out, tmp_path / "again")
    meta2 = json.loads((again / "meta.json").read_text())
    assert meta2["which"] == "student" and meta2["step"] == 10 and meta2["source"]["kind"] == "export"
    assert (again / "backbone.safetensors").read_bytes() == (out / "backbone.safetensors").read_bytes()
    with pytest.raises(CheckpointRefused, match="export of the student, not the teacher"):
        read_checkpoint(out, "teacher")


def test_timm_pretrained_loads_the_export_strictly(tmp_path):
    import timm

    r = make_run(tmp_path, kwargs={}, networks=("teacher",))  # the released architecture: timm needs no extra arguments
    out = export(r["run"], tmp_path / "export")
    teacher = r["nets"]["teacher"][0]
    path = str(out / "backbone.safetensors")
    model = timm.create_model("container_light", pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=path))
    _assert_same_state(model, teacher.state_dict())  # every key present and equal: a strict load
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), teacher.eval()(x))
    # Fine-tuning: a new classifier, the rest from the export.
    clf = timm.create_model("container_light", pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=path))
    mine = load_backbone(out, num_classes=10)
    for m in (clf, mine):
        assert m.head.out_features == 10
        assert all(torch.equal(m.state_dict()[k], v) for k, v in teacher.state_dict().items())


def test_safetensors_files_as_sources(tmp_path):
    r = make_run(tmp_path)
    # A step's teacher.safetensors reads its sibling meta.json (architecture, step).
    ckpt = read_checkpoint(r["step_dir"] / "student.safetensors")
    assert (ckpt.which, ckpt.step, ckpt.model_kwargs) == ("student", 10, TINY)
    with pytest.raises(CheckpointRefused, match="holds the student, not the teacher"):
        read_checkpoint(r["step_dir"] / "student.safetensors", "teacher")
    # A bare backbone file: the architecture is given by the caller.
    bare = tmp_path / "bare.safetensors"
    save_file(r["nets"]["teacher"][0].state_dict(), str(bare))
    _assert_same_state(load_backbone(bare, **TINY), r["nets"]["teacher"][0].state_dict())
    _assert_same_state(load_backbone(bare, "teacher", **TINY), r["nets"]["teacher"][0].state_dict())  # nothing to pick
    with pytest.raises(ValueError, match=r"do not fit container_light\(\).*missing.*unexpected"):
        load_backbone(bare)  # default architecture: the shapes do not fit, and it says so


def _official_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> allenai/container's (an explicit table, independent of the converter)."""
    out = {}
    for key, value in state.items():
        m = re.match(r"stages\.(\d)\.(patch_embed|blocks)\.(.+)$", key)
        if not m:
            out[key] = value
            continue
        s = int(m.group(1)) + 1
        if m.group(2) == "patch_embed":
            out[f"patch_embed{s}.{m.group(3)}"] = value
            continue
        i, rest = m.group(3).split(".", 1)
        for ours, theirs in (("aggregation.input_proj.", "conv1."), ("aggregation.output_proj.", "conv2."),
                             ("aggregation.affinity.conv.", "attn."), ("aggregation.affinity.static_affinity.conv.", "conv."),
                             ("aggregation.affinity.mix_logit", "sa_weight")):
            if rest.startswith(ours):
                rest = theirs + rest[len(ours):]
                break
        out[f"blocks{s}.{i}.{rest}"] = value
    return out


def test_weights_only_torch_files(tmp_path):
    r = make_run(tmp_path)
    (teacher, t_head), (student, s_head) = r["nets"]["teacher"], r["nets"]["student"]
    # Official DINO layout: teacher/student dicts, DDP prefix on the student, args as a Namespace.
    dino = {
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()}, **{f"head.{k}": v for k, v in t_head.items()}},
        "student": {**{f"module.backbone.{k}": v for k, v in student.state_dict().items()}, **{f"module.head.{k}": v for k, v in s_head.items()}},
        "epoch": 3, "args": argparse.Namespace(arch="container_light", lr=0.0005),
    }
    torch.save(dino, tmp_path / "checkpoint.pth")
    _assert_same_state(load_backbone(tmp_path / "checkpoint.pth", **TINY), teacher.state_dict())
    out = export(tmp_path / "checkpoint.pth", tmp_path / "export", "student", include_head=True, model_kwargs=TINY)
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["which"], meta["epoch"], meta["source"]["kind"], meta["model"]["kwargs"]) == ("student", 3, "torch", TINY)
    assert meta["dino_head"]["config"] == {k: v for k, v in HEAD.items() if k != "norm_last_layer"}  # inferred
    _assert_same_state(load_backbone(out), student.state_dict())

    # The official allenai/container checkpoint: {"model": ...} with their names and a classifier.
    supervised = _randomise(container_light(num_classes=5, **TINY), seed=3)
    torch.save({"model": _official_names(supervised.state_dict()), "epoch": 299}, tmp_path / "container.pt")
    ckpt = read_checkpoint(tmp_path / "container.pt")
    assert any("official" in n for n in ckpt.notes) and any("classifier" in n for n in ckpt.notes)
    expected = {k: v for k, v in supervised.state_dict().items() if not k.startswith("head.")}
    _assert_same_state(load_backbone(tmp_path / "container.pt", **TINY), expected)


def test_refusals_name_the_file_and_what_is_accepted(tmp_path):
    marker = tmp_path / "unpickled"
    torch.save({"state": _Evil(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointRefused, match=r"evil\.pth: refused, torch.load\(weights_only=True\) cannot read it \(Unsupported global.*arbitrary code"):
        load_backbone(tmp_path / "evil.pth")
    assert not marker.exists()

    for name in ("weights.npz", "model.ckpt", "model.bin"):
        (tmp_path / name).write_bytes(b"\0" * 16)
        with pytest.raises(CheckpointRefused, match=re.escape(name) + r": unsupported file type; accepted: a run folder"):
            export(tmp_path / name, tmp_path / "out")
    (tmp_path / "broken.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointRefused, match=r"broken\.pt: refused, torch.load\(weights_only=True\) cannot read it .*damaged or not a torch file"):
        read_checkpoint(tmp_path / "broken.pt")
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{}")
    with pytest.raises(CheckpointRefused, match=r"broken\.safetensors: not a readable safetensors file"):
        read_checkpoint(tmp_path / "broken.safetensors")
    with pytest.raises(FileNotFoundError, match="missing"):
        read_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointRefused, match="none of the expected files"):
        read_checkpoint(tmp_path / "empty")
    torch.save({"teacher": {"x": torch.zeros(1)}}, tmp_path / "teacher_only.pth")
    with pytest.raises(CheckpointRefused, match=r"has no student weights \(found: teacher\)"):
        read_checkpoint(tmp_path / "teacher_only.pth", "student")


def test_incomplete_run_and_existing_output(tmp_path, caplog):
    r = make_run(tmp_path, with_latest=False)  # as the trainer resumes it: from the newest complete step
    with caplog.at_level("WARNING"):
        export(r["run"], tmp_path / "from_run")
    assert "without checkpoints/latest" in caplog.text and "reading the newest complete checkpoint" in caplog.text
    assert json.loads((tmp_path / "from_run" / "meta.json").read_text())["step"] == 10
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointRefused, match="without checkpoints/latest"):
        export(empty, tmp_path / "nothing")
    out = export(r["step_dir"], tmp_path / "out", include_head=True)
    with pytest.raises(FileExistsError, match="overwrite"):
        export(r["step_dir"], tmp_path / "out")
    export(r["step_dir"], tmp_path / "out", overwrite=True)  # without the head: the old head file goes
    assert sorted(os.listdir(out)) == ["README.md", "backbone.safetensors", "config.json", "meta.json", "model.safetensors"]


def test_cli_export(tmp_path, capsys):
    from ssl_container.cli import main

    r = make_run(tmp_path)
    evals = tmp_path / "evals.json"
    evals.write_text(json.dumps({"knn_top1": 0.5}))
    assert main(["export", str(r["run"]), "--which", "student", "--head", "--eval-json", str(evals),
                 "--out", str(tmp_path / "exp")]) == 0
    assert "exported container_light student (step 10)" in capsys.readouterr().out
    meta = json.loads((tmp_path / "exp" / "meta.json").read_text())
    assert meta["which"] == "student" and meta["eval"] == {"knn_top1": 0.5} and meta["dino_head"]
    (tmp_path / "x.onnx").write_bytes(b"")
    assert main(["export", str(tmp_path / "x.onnx"), "--out", str(tmp_path / "y")]) == 2
    assert "x.onnx: unsupported file type" in capsys.readouterr().err


@pytest.mark.parametrize("size", [64, 96])
def test_onnx_export_matches_pytorch_at_two_sizes(tmp_path, size, capsys):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in the dev extras: pip install -e .[dev]")
    from ssl_container.cli import main

    r = make_run(tmp_path)
    assert main(["export", str(r["run"]), "--onnx", "--out", str(tmp_path / "exp")]) == 0
    assert "model.onnx (dynamic batch, height, width)" in capsys.readouterr().out
    meta = json.loads((tmp_path / "exp" / "meta.json").read_text())
    onnx_file = tmp_path / "exp" / "model.onnx"
    assert meta["onnx"]["sha256"] == hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    model = load_backbone(tmp_path / "exp").eval()  # the teacher
    for batch in (1, 3):  # dynamic batch, and a size other than the 224 of the trace
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size + batch))
        got = session.run(None, {"images": x.numpy()})[0]
        with torch.no_grad():
            want = model(x).numpy()
        assert got.shape == want.shape == (batch, 128)
        assert abs(got - want).max() <= 1e-4
    # exporting again without --onnx removes the stale graph rather than leaving it beside new weights
    assert main(["export", str(r["run"]), "--overwrite", "--out", str(tmp_path / "exp")]) == 0
    assert not onnx_file.exists()


def test_export_is_a_timm_local_dir_and_hub_folder(tmp_path):
    import timm

    r = make_run(tmp_path)
    out = export(r["run"], tmp_path / "exp")
    for name in ("config.json", "model.safetensors", "README.md"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "container_light" and cfg["num_classes"] == 0 and cfg["num_features"] == 128
    assert cfg["model_args"] == {k: list(v) for k, v in TINY.items()}
    assert cfg["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406] and cfg["pretrained_cfg"]["crop_pct"] == 0.875
    model = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0).eval()
    ours = load_backbone(out).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), ours(x))
    _assert_same_state(model, r["nets"]["teacher"][0].state_dict())
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm") and "knn_top1 | 0.42" in card and "local-dir:" in card


def _record_files(step_dir: Path) -> None:
    """What the trainer writes into meta.json at save time: the size and sha256 of every file."""
    from ssl_container.run_folder import folder_files

    meta = json.loads((step_dir / "meta.json").read_text())
    meta["files"] = folder_files(step_dir)
    (step_dir / "meta.json").write_text(json.dumps(meta))


def _flip(path: Path, n: int = 400) -> None:
    """n bytes of the tensor data inverted in place: same size, a plausible file, wrong weights."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) - n, len(data)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_refused_by_every_reader_and_a_run_folder_falls_back(tmp_path, capsys, caplog):
    import timm

    from ssl_container.cli import main

    older = make_run(tmp_path, kwargs={}, step=10, networks=("teacher",))
    newer = make_run(tmp_path / "n", kwargs={}, step=20, networks=("teacher",))
    run = older["run"]
    os.replace(newer["step_dir"], run / "checkpoints" / "step_00000020")
    (run / "checkpoints" / "latest").write_text("step_00000020\n")
    damaged = run / "checkpoints" / "step_00000020"
    for step_dir in (older["step_dir"], damaged):
        _record_files(step_dir)
    assert load_backbone(run).state_dict().keys()  # intact: step 20 is read
    assert read_checkpoint(run).step == 20
    weights = damaged / "teacher.safetensors"
    size = weights.stat().st_size
    _flip(weights)
    assert weights.stat().st_size == size
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    # The step folder itself: refused by every reader, with the fix.
    for read in (lambda: read_checkpoint(damaged), lambda: load_backbone(damaged), lambda: export(damaged, tmp_path / "x")):
        with pytest.raises(CheckpointRefused, match=r"step_00000020: damaged, teacher\.safetensors does not match the sha256"):
            read()
    assert main(["export", str(damaged), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "damaged" in err[0] and "restore the file from a copy" in err[0]
    assert not (tmp_path / "x").exists()

    # The run folder: the newest intact step, said out loud.
    with caplog.at_level("WARNING"):
        ckpt = read_checkpoint(run)
    assert ckpt.step == 10 and any("read step_00000010 instead, the newest intact checkpoint" in n for n in ckpt.notes)
    assert "step_00000020 is damaged" in caplog.text
    _assert_same_state(load_backbone(run), older["nets"]["teacher"][0].state_dict())
    out = export(run, tmp_path / "export")
    assert json.loads((out / "meta.json").read_text())["step"] == 10
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # the readers wrote nothing

    # An export damaged after it was written: timm's loading (local-dir: too) and load_backbone refuse it.
    _flip(out / "model.safetensors")
    with pytest.raises(RuntimeError, match="does not match the sha256 recorded"):
        timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0)
    _flip(out / "backbone.safetensors")
    with pytest.raises(RuntimeError, match="does not match the sha256 recorded"):
        timm.create_model("container_light", pretrained=True, num_classes=0,
                          pretrained_cfg_overlay=dict(file=str(out / "backbone.safetensors")))
    with pytest.raises(CheckpointRefused, match="sha256"):
        load_backbone(out)
    # Nothing intact at all: a refusal naming each damaged step.
    _flip(older["step_dir"] / "teacher.safetensors")
    with pytest.raises(CheckpointRefused, match=r"no intact checkpoint \(step_00000020 is damaged .*step_00000010 is damaged"):
        read_checkpoint(run)


def test_the_export_states_the_resolution_it_was_trained_and_evaluated_at_and_its_floors(tmp_path):
    """config.json said input 224, pool 7x7, crop 0.875 for a backbone trained and evaluated at 64 px, and
    the model card linked to a placeholder and showed the k-NN figure without its floors."""
    r = make_run(tmp_path)
    meta = json.loads((r["step_dir"] / "meta.json").read_text())
    meta["config"] = {"data": {"crops": {"global_size": 64}}}  # what the trainer records
    (r["step_dir"] / "meta.json").write_text(json.dumps(meta))
    out = export(r["run"], tmp_path / "demo_like", eval_results={
        "knn_top1_k20": 43.7, "knn_top1_k20_floor_random_init": 30.1, "knn_top1_k20_floor_raw_pixels": 35.2,
        "knn_resolution": 64, "knn_crop_pct": 1.0})
    cfg = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert cfg["input_size"] == [3, 64, 64] and cfg["pool_size"] == [2, 2] and cfg["crop_pct"] == 1.0
    assert json.loads((out / "meta.json").read_text())["resolution"] == {"trained": 64, "evaluated": 64,
                                                                          "crop_pct": 1.0}
    card = (out / "README.md").read_text()
    assert "https://github.com/)" not in card and "trained at 64x64 px" in card
    assert "| knn_top1_k20_floor_raw_pixels | 35.2 |" in card and "better of them" in card
    import timm

    from timm.data import resolve_data_config

    model = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0)
    assert tuple(resolve_data_config({}, model=model)["input_size"]) == (3, 64, 64)

    again = export(out, tmp_path / "re_export")  # an export of an export keeps the training resolution
    assert json.loads((again / "meta.json").read_text())["resolution"]["trained"] == 64
    assert "better of them" in (again / "README.md").read_text()  # the recorded floors travel with the figures
    bare = export(r["step_dir"], tmp_path / "no_floors", eval_results={"knn_top1_k20": 43.7})
    assert "judge them against such floors" in (bare / "README.md").read_text()


@pytest.mark.parametrize("module", ["eval.knn", "eval.linear", "eval.features", "eval.detection"])
def test_eval_commands_refuse_bad_weights_in_one_line(tmp_path, capsys, module):
    """Bad weights for eval ended in a 15-line traceback, exit 1; now one line naming the file, exit 2."""
    import importlib

    from PIL import Image

    (tmp_path / "bad.safetensors").write_bytes(b"garbage, not safetensors")
    folder = tmp_path / "images"
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        Image.new("RGB", (40, 40), (200, 10, 10) if cls == "a" else (10, 10, 200)).save(folder / cls / "x.png")
    args = ["--weights", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "out")]
    if module == "eval.detection":
        coco = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128"
        if not (coco / "annotations").is_dir():
            pytest.skip(f"needs {coco} (../shared/data)")
        args += ["--data", str(coco), "--init", "random", "dino"]  # refused before the random init's fine-tuning
    elif module == "eval.features":
        args += ["--folder", str(folder)]
    else:
        args += ["--train-folder", str(folder), "--val-folder", str(folder)]
    rc = importlib.import_module(module).main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"python -m {module}:")]
    assert len(lines) == 1 and "bad.safetensors: not a readable safetensors file" in lines[0], err
    assert "Traceback" not in err


def test_diverged_weights_are_refused_by_export_and_eval_unless_allowed(tmp_path, capsys):
    """A 95 %-NaN teacher printed a k-NN of 33.33 % and exported silently; now both refuse it in one line."""
    from safetensors.torch import load_file

    from ssl_container.cli import main

    r = make_run(tmp_path, networks=("teacher",))
    path = r["step_dir"] / "teacher.safetensors"
    state = load_file(str(path))
    key = next(k for k in state if k.startswith("backbone.") and state[k].is_floating_point() and state[k].numel() > 4)
    state[key][:3] = float("nan")
    state[key][3] = float("inf")
    save_file(state, str(path))
    with pytest.raises(CheckpointRefused, match="4 of .* backbone weights are NaN or infinite"):
        load_backbone(r["run"])
    assert main(["export", str(r["run"]), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--allow-nonfinite" in err[0] and not (tmp_path / "x").exists()
    assert main(["export", str(r["run"]), "--out", str(tmp_path / "x"), "--allow-nonfinite"]) == 0
    assert read_checkpoint(tmp_path / "x", allow_nonfinite=True).step == 10


def test_an_interrupted_export_leaves_the_old_one_whole_and_no_temporaries(tmp_path, monkeypatch, capsys):
    """SIGTERM during `export --onnx --overwrite` died without a line and left .tmp files (up to 80 MB) and
    new weights beside the old meta.json, which local-dir: then loaded."""
    import ssl_container.export as export_mod
    from ssl_container.cli import main
    from ssl_container.signals import Stopped

    first = make_run(tmp_path / "a", networks=("teacher",))
    second = make_run(tmp_path / "b", networks=("teacher",), step=20)
    out = tmp_path / "exp"
    export(first["run"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / ".model.onnx.abc123.tmp").write_bytes(b"left by an older version")

    def stopped(*args, **kwargs):
        raise Stopped(15)  # what stop_raises raises when SIGTERM arrives mid-export

    monkeypatch.setattr(export_mod, "export_onnx", stopped)
    assert main(["export", str(second["run"]), "--out", str(out), "--overwrite", "--onnx"]) == 128 + 15
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing half-written" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old export, whole; temporaries gone
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    monkeypatch.undo()
    export(second["run"], out, overwrite=True)
    assert json.loads((out / "meta.json").read_text())["step"] == 20


def test_an_export_into_a_run_folder_is_refused_before_torch_loads(tmp_path):
    import subprocess
    import sys

    r = make_run(tmp_path)
    meta = (r["step_dir"] / "meta.json").read_bytes()
    for target in (r["step_dir"], r["run"], r["run"] / "export"):
        proc = subprocess.run([sys.executable, "-c", "import sys; from ssl_container.cli import main; "
                               f"rc = main(['export', {str(r['run'])!r}, '--out', {str(target)!r}, '--overwrite']); "
                               "print('torch' in sys.modules); sys.exit(rc)"], capture_output=True, text=True)
        assert proc.returncode == 2 and "inside the run folder" in proc.stderr, proc.stderr
        assert proc.stdout.strip() == "False"
    assert (r["step_dir"] / "meta.json").read_bytes() == meta


def test_a_stop_signal_during_the_swap_waits_for_it(tmp_path, monkeypatch, capsys):
    """Python runs signal handlers in the main thread whichever thread the signal hit, so blocking it in the
    main thread did not hold it: a SIGTERM mid-swap left new weights beside the old meta.json."""
    import signal as _signal

    import ssl_container.export as export_mod
    from ssl_container.cli import main

    first = make_run(tmp_path / "a", networks=("teacher",))
    second = make_run(tmp_path / "b", networks=("teacher",), step=20)
    out = tmp_path / "exp"
    export(first["run"], out)
    real_replace, calls = os.replace, []

    def replace_then_signal(src, dst):
        if Path(dst).parent == out:  # the swap's renames (the staging writes rename inside the staging folder)
            calls.append(dst)
        if len(calls) == 2 and Path(dst).parent == out:
            os.kill(os.getpid(), _signal.SIGTERM)  # mid-swap: one file moved, the rest not yet
        return real_replace(src, dst)

    monkeypatch.setattr(export_mod.os, "replace", replace_then_signal)
    assert main(["export", str(second["run"]), "--out", str(out), "--overwrite"]) == 128 + 15
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds the new export, complete" in err[0], err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["step"] == 20 and read_checkpoint(out).step == 20  # the new export, whole and verified
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_export_beside_an_unrelated_checkpoints_folder_is_not_refused(tmp_path):
    r = make_run(tmp_path / "src")
    (tmp_path / "home" / "checkpoints").mkdir(parents=True)  # somebody's own folder of that name, no run
    out = export(r["run"], tmp_path / "home" / "exports" / "x")
    assert (out / "meta.json").is_file()
