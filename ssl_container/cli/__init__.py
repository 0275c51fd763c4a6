"""The ``ssl-container`` command line: one subcommand per job, each a thin shim over library calls.

Argument parsing lives here and nowhere below it in the library, so every job is also callable from
Python with plain arguments.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

# Only the standard library and config (YAML) at the top: `--help`, `--print-config` and `--dry-run`
# must answer at once, and torch + timm take ~5 s to import. Each handler imports what its job needs.

# The demo's recipe is configs/demo.yaml, shipped inside the package (ssl_container/configs): the
# small-budget recipe (configs/small_budget.yaml, see there why each choice) for a fixed number of steps.
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def demo_recipe() -> dict[str, Any]:
    """configs/demo.yaml as a mapping (its data.urls are replaced by the data the demo finds)."""
    import yaml

    return yaml.safe_load(DEMO_CONFIG.read_text())


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="dataset folder with dataset.json (default: ../shared/data/imagenette; "
                        "'openclipart': Debian's Open Clip Art drawings, what a machine without ../shared gets; "
                        "'fashion-mnist': Debian's Fashion-MNIST)")
    parser.add_argument("--out", default="runs/demo", help="output folder (pretraining run, export, report)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what an earlier demo left in --out (pretrain/, export/, pictures.png, demo.json); "
                             "without it the demo refuses to touch them")
    parser.add_argument("--steps", type=int, default=None, help=f"DINO steps (default {demo_recipe()['max_steps']})")
    parser.add_argument("--seed", type=int, default=0, help="training seed (also the random-init floor's)")
    parser.add_argument("--eval-subset", action="store_true",
                        help="k-NN on 3 reference shards and 1 held-out shard only (default: every image of both "
                             "splits, about 50 s on 2 cores; the Open Clip Art set has 3 + 1 shards, so there it "
                             "changes nothing)")
    parser.add_argument("--eval-all", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old commands


# `ssl-container models` at the default sizes prints this stored table (measured by
# ssl_container.models.info.describe_models; tests/test_cli_models.py keeps the two equal), so the
# answer comes without the 5-7 s of importing torch and tracing four networks.
MODELS_TABLE = Path(__file__).with_name("models_table.json")


def _cmd_models(args: argparse.Namespace) -> int:
    import json

    stored = json.loads(MODELS_TABLE.read_text())
    if list(args.sizes) == stored["sizes"]:
        rows = stored["rows"]
    else:
        from ssl_container.models.info import describe_models

        rows = describe_models(args.sizes)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'model':<24}{'params':>14}" + "".join(f"{'GMACs@' + str(s):>12}" for s in args.sizes))
    for r in rows:
        print(f"{r['model']:<24}{r['params']:>14,}" + "".join(f"{r['gmacs'][str(s)]:>12.3f}" for s in args.sizes))
    pam = [r for r in rows if r.get("params_by_size")]
    if pam:
        print("container_pam's token-MLP is sized to the input: parameters above are at the first size; "
              + ", ".join(f"{s}: {n:,}" for s, n in pam[0]["params_by_size"].items()))
    print("container_light_narrow is this project's quarter-width Container-Light (the demo's), not the paper's")
    return 0


# What a demo writes into --out; an earlier demo's are replaced only with --overwrite.
DEMO_OUTPUTS = ("pretrain", "export", "pictures.png", "retrieval.png", "demo.json")


def demo_outputs_refusal(out_dir: Path, overwrite: bool) -> str | None:
    found = [name for name in DEMO_OUTPUTS if (out_dir / name).exists()]
    if not found or overwrite:
        return None
    return (f"{out_dir} already holds {', '.join(found)} (an earlier demo, or a run of your own): pass --overwrite "
            "to replace them, or --out NEW_FOLDER; nothing was changed")


def _cmd_demo(args: argparse.Namespace) -> int:
    refusal = demo_outputs_refusal(Path(args.out), args.overwrite)
    if refusal:  # before torch loads: the answer comes at once
        print(f"ssl-container demo: {refusal}", file=sys.stderr)
        return 2
    print(f"[demo] starting: loading PyTorch, then the data (output in {args.out})", flush=True)  # torch takes seconds
    from ssl_container.cli.demo import run_from_args

    return run_from_args(args)


def _cmd_train(args: argparse.Namespace) -> int:
    # The trainer's arguments are the config's (also `python -m ssl_container.train` under torchrun);
    # --help and --print-config are answered here, before the trainer and torch are imported.
    from ssl_container.config import print_resolved, train_argument_parser

    parsed = train_argument_parser().parse_args(args.train_args)
    if parsed.print_config:
        return print_resolved(parsed.config, parsed.overrides)
    from ssl_container.train import main as train_main

    return train_main(args.train_args)


def _cmd_export(args: argparse.Namespace) -> int:
    import json

    from ssl_container.run_folder import export_target_problem

    refusal = export_target_problem(Path(args.out), args.overwrite) or \
        (None if Path(args.source).exists() else f"{args.source}: no such file or folder")
    if refusal:  # before torch loads: a refusal answers at once
        print(f"ssl-container export: {refusal}", file=sys.stderr)
        return 2
    from ssl_container.export import CheckpointRefused, ExportStoppedAfterSwap, export
    from ssl_container.signals import Stopped, exit_code, stop_raises

    evals = None
    if args.eval_json:
        with open(args.eval_json) as f:
            evals = json.load(f)
    try:
        with stop_raises():  # a stop signal unwinds the export: the old export folder stays as it was
            out = export(args.source, args.out, args.which, include_head=args.head, eval_results=evals,
                         model_name=args.model, overwrite=args.overwrite, onnx=args.onnx,
                         allow_nonfinite=args.allow_nonfinite)
    except (CheckpointRefused, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"ssl-container export: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full, read-only or over-quota disk: an earlier export there is left whole
        print(f"ssl-container export: cannot write {args.out}: {err.strerror or err}; an earlier export there is "
              "left as it was", file=sys.stderr)
        return 2
    except Stopped as stop:
        print(f"ssl-container export: {stop}; {args.out} is as it was before (nothing half-written)", file=sys.stderr)
        return exit_code(stop.signum)
    except ExportStoppedAfterSwap as stop:
        print(f"ssl-container export: {stop}", file=sys.stderr)
        return exit_code(stop.signum)
    meta = json.loads((out / "meta.json").read_text())
    print(f"exported {meta['model']['name']} {meta['which'] or ''} (step {meta['step']}) to {out}: "
          f"backbone.safetensors sha256 {meta['weights']['sha256']}"
          + (", dino_head.safetensors" if meta.get("dino_head") else "")
          + (", model.onnx (dynamic batch, height, width)" if meta.get("onnx") else ""))
    return 0


def _cmd_visualize(args: argparse.Namespace) -> int:
    missing = [p for p in args.images if not Path(p).exists()]
    if missing:  # before torch loads
        print(f"ssl-container visualize: no such image or folder: {missing[0]}"
              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""), file=sys.stderr)
        return 2
    from ssl_container.downstream.backbone import eval_backbone
    from ssl_container.downstream.visualize import draw, describe, load_images

    try:
        model = eval_backbone(args.weights, model=args.model, which=args.which, seed=args.seed)
        images, files = load_images(args.images, size=args.size, limit=args.max_images, fit=args.fit)
    except (FileNotFoundError, ValueError) as err:
        print(f"ssl-container visualize: {err}", file=sys.stderr)
        return 2
    pictures = describe(model, images)
    out = Path(args.out)
    title = f"{args.weights}{f' ({args.which})' if args.which else ''}, drawn at {args.size} px"
    written = [draw([pictures.select([i])], out / f"{i:02d}_{f.stem}.png", title=title) for i, f in enumerate(files)]
    grid = draw([pictures], out / "grid.png", title=title)
    heads = "no attention (the model does not attend)" if pictures.attention is None else \
        f"attention of {pictures.attention.shape[1]} heads"
    print(f"visualize: {len(files)} images at {args.size} px, PCA of {', '.join(pictures.pca)} and {heads}: "
          f"{len(written)} PNGs and {grid} in {out}")
    return 0


# --- shards handlers (data pipeline; the parsers are in the shards section of build_parser) ---------
def _parse_bytes(text: str) -> int:
    import re

    m = re.fullmatch(r"\s*([\d.]+)\s*([kKmMgGtT]?)i?[bB]?\s*", str(text))
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500MB, 1GB, 1048576)")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def _cmd_shards_write(args: argparse.Namespace) -> int:
    import json

    from ssl_container.data.shards import write_shards

    classes = None
    if args.classes:
        with open(args.classes) as f:
            classes = [line.strip() for line in f if line.strip()]
    source = args.source[0] if len(args.source) == 1 else args.source
    try:
        entry = write_shards(source, args.out_dir, split=args.split, name=args.name, max_count=args.max_count,
                             max_bytes=args.max_bytes, seed=args.seed, source_kind=args.source_kind, classes=classes,
                             strict=args.strict)
    except (ValueError, FileNotFoundError) as err:
        print(f"ssl-container shards write: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full, read-only or over-quota disk: the existing set was left as it was
        print(f"ssl-container shards write: cannot write in {args.out_dir}: {err.strerror or err} "
              f"({getattr(err, 'filename', None) or args.out_dir}); nothing of an existing set there was changed",
              file=sys.stderr)
        return 2
    print(json.dumps({"out_dir": args.out_dir, "split": args.split,
                      **{k: entry[k] for k in ("shards", "num_shards", "num_samples")},
                      "skipped": len(entry.get("skipped", []))}))
    return 0


def _cmd_shards_verify(args: argparse.Namespace) -> int:
    import json

    from ssl_container.data.shards import verify_shards

    report = verify_shards(args.path, splits=args.split, decode=not args.no_decode, workers=args.workers)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        for p in report.problems:
            src = f" source={p['source']}" if p.get("source") else ""
            print(f"BAD shard={p['shard']} key={p['key'] or '-'}{src} kind={p['kind']}: {p['detail']}")
        summary = report.to_dict()
        print(f"{'OK' if report.ok else 'FAILED'}: {summary['num_shards']} shards, {summary['num_samples']} samples, "
              f"{len(report.problems)} problems")
    return 0 if report.ok else 1


def _cmd_launch(args: argparse.Namespace) -> int:
    # The launcher parses its own arguments (also `python -m launch.submit`); imported only here, so
    # the library never depends on launch/ otherwise.
    from launch.submit import main as launch_main

    return launch_main(args.launch_args)


def _cmd_study(args: argparse.Namespace) -> int:
    # The study app parses its own arguments (also `python -m study`); it builds on eval/ and launch/.
    from study.cli import main as study_main

    return study_main(args.study_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssl-container",
        description="DINO pretraining of Container backbones: data, training, evaluation, export.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("models", help="parameters and GMACs of the Container family")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 96], help="square input sizes")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("train", help="DINO pretraining (one process, torchrun, srun or submitit)",
                       add_help=False, prefix_chars="\x00")  # every argument goes to ssl_container.train
    p.add_argument("train_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("demo", help="pretrain -> k-NN -> export on real images it finds or converts, minutes on CPU",
                       description="DINO pretraining of container_light_narrow with configs/demo.yaml on "
                       "../shared/data/imagenette when present, else on Debian's Open Clip Art drawings (converted to "
                       "shards on first use; no data ships with the project), then the teacher's k-NN top-1 next to "
                       "random init and raw pixels under the same protocol, then the export. 6 to 10 minutes on 2 "
                       "CPU cores (the conversion included).")
    add_demo_arguments(p)
    p.set_defaults(func=_cmd_demo)

    # --- export (backbone -> safetensors + meta.json) ------------------------------------------
    p = sub.add_parser("export", help="export a trained backbone as safetensors + meta.json",
                       description="Export the fp32 backbone (teacher by default) as DIR/backbone.safetensors "
                       "with DIR/meta.json (architecture, step, config digest, eval results, sha256). SOURCE: a "
                       "run folder (latest checkpoint), a step folder, an exported folder, a .safetensors file "
                       "or a .pth/.pt file readable with torch.load(weights_only=True); anything else is refused.")
    p.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--which", choices=("teacher", "student"), default=None,
                   help="which DINO network (default: teacher where both exist)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--head", action="store_true", help="also write the DINO head as dino_head.safetensors")
    p.add_argument("--eval-json", default=None, help="JSON file of evaluation results to record in meta.json")
    p.add_argument("--model", default=None, help="architecture when the source does not record it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="export weights holding NaN or infinity (a diverged run) instead of refusing them")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (dynamic batch, height, width; "
                   "needs the onnx package: pip install -e .[onnx])")
    p.set_defaults(func=_cmd_export)

    # --- visualize (PCA of feature maps, attention) ------------------------------------------
    p = sub.add_parser("visualize", help="PNG pictures of what a backbone learned: PCA of its feature maps, its attention",
                       description="For each image: the PCA of the stage-3 and stage-4 feature maps as RGB (one PCA "
                       "fitted jointly on all images, background thresholded on the first component, DINOv2-style) "
                       "and the last stage's attention per head from the pooled query (a ViT: the class token's). "
                       "WEIGHTS: an export, a run folder, a checkpoint, or a model name (random initialisation).")
    p.add_argument("weights", metavar="WEIGHTS")
    p.add_argument("--images", nargs="+", required=True, help="image files and/or folders of images")
    p.add_argument("--out", default="pictures", help="output folder: one PNG per image and grid.png (default: pictures)")
    p.add_argument("--size", type=int, default=224, help="resize the short side and centre-crop to this (default 224)")
    p.add_argument("--max-images", type=int, default=8, help="at most this many images (default 8)")
    p.add_argument("--fit", choices=("crop", "pad"), default="crop",
                   help="crop: short side to --size and a centre crop (the evaluation transform, default); pad: the "
                        "whole image on white, for drawings whose edges a crop would cut")
    p.add_argument("--which", choices=("teacher", "student"), default=None, help="which DINO network (default: teacher)")
    p.add_argument("--model", default=None, help="architecture when the weights do not record it")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed when WEIGHTS is a model name")
    p.set_defaults(func=_cmd_visualize)

    # --- shards (data pipeline) ---------------------------------------------------------------
    p = sub.add_parser("shards", help="write / verify WebDataset shards with a dataset.json")
    shards_sub = p.add_subparsers(dest="shards_command", metavar="ACTION", required=True)
    w = shards_sub.add_parser(
        "write", help="an image folder, a file list (path[,label]) or shards -> shuffled shards + dataset.json")
    w.add_argument("source", nargs="+", help="ImageFolder root (root/<class>/<image>), a .txt/.csv file list, "
                                             "or shard URLs / brace patterns")
    w.add_argument("out_dir", help="output folder (dataset.json is created or updated there)")
    w.add_argument("--split", default="train", help="split name, also the shard file prefix (default: train)")
    w.add_argument("--name", default=None, help="dataset name for dataset.json and keys (default: out_dir's name)")
    w.add_argument("--from", dest="source_kind", choices=["auto", "folder", "list", "shards"], default="auto")
    w.add_argument("--max-count", type=int, default=1000, help="samples per shard at most (default: 1000)")
    w.add_argument("--max-bytes", type=_parse_bytes, default="1GB", help="bytes per shard at most (default: 1GB)")
    w.add_argument("--seed", type=int, default=0, help="shuffle seed (default: 0)")
    w.add_argument("--classes", default=None, help="file with one class name per line (file lists with names)")
    w.add_argument("--strict", action="store_true",
                   help="refuse a source that is not a readable image (default: skip it, count it, list its path)")
    w.set_defaults(func=_cmd_shards_write)
    v = shards_sub.add_parser("verify", help="check sha256 digests and decode every sample; exit 1 on any problem")
    v.add_argument("path", help="dataset folder, its dataset.json, or a shard pattern")
    v.add_argument("--split", action="append", default=None, help="only these splits (repeatable)")
    v.add_argument("--no-decode", action="store_true", help="digests, members and counts only")
    v.add_argument("--workers", type=int, default=1, help="processes (one shard each at a time)")
    v.add_argument("--json", action="store_true", help="print the whole report as JSON")
    v.set_defaults(func=_cmd_shards_verify)

    # --- launch (Slurm / local jobs through submitit; options parsed by launch/submit.py) --------
    p = sub.add_parser("study", help="pretrain several backbones under one recipe and compare them (study.md/json/png)",
                       add_help=False, prefix_chars="\x00")  # every argument goes to study.cli
    p.add_argument("study_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_study)

    p = sub.add_parser("launch", help="submit training, sweeps or evaluations to Slurm (submitit); --local, --dry-run",
                       add_help=False, prefix_chars="\x00")  # every argument goes to launch.submit
    p.add_argument("launch_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_launch)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
