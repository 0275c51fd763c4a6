"""The layers as a contract: every import of the project, parsed with ast, checked against the rules.

    library  ssl_container.*           (never imports launch, eval or the front ends)
      models                           (imports nothing else of the project)
      data                             (never imports models)
      dino                             (tensors, not engines: no trainer, train, DeepSpeed)
      trainer                          (what trains: run building, the step, the loop, engine, checkpoints,
                                        the resume plan, the run folder, metrics and trackers)
      downstream                       (features, detection backbone, pictures of a trained backbone)
      utils                            (imports nothing else of the project)
    eval     eval.*                    (the library only)
    launch   launch.*                  (the library only)
    study    study.*                   (an app over the library, eval and launch; nothing but the front imports it)
    front    ssl_container.cli.*, ssl_container.__main__   (may import everything; nothing imports them)

Only trainer/engine.py and trainer/checkpoint.py import DeepSpeed; only distributed.py reads the rank variables of
torchrun and Slurm from the environment. A failure names the file and line of each breach. The shape of
the house is checked here too: the package root holds at most ten modules, the trainer's components take
their own config section rather than the whole run config, and no trainer function outgrows a screen.
"""
import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ssl_container", "eval", "launch", "study")
FRONT = ("ssl_container.cli", "ssl_container.__main__")
RANK_VARIABLES = re.compile(r"^(SLURM_\w+|RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|MASTER_ADDR|MASTER_PORT)$")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            out[_module_name(path)] = (path, ast.parse(path.read_text(), str(path)))
    return out


SOURCES = _sources()


def _imports(module: str, tree: ast.Module) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement, at any depth (functions included)."""
    found = []
    is_package = SOURCES[module][0].name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            found += [(f"{target}.{a.name}", node.lineno) for a in node.names if f"{target}.{a.name}" in SOURCES]
    return found


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _layer(name: str) -> str:
    if any(_within(name, f) for f in FRONT):
        return "front"
    return name.split(".")[0]


def _breaches(rule) -> list[str]:
    bad = []
    for module, (path, tree) in SOURCES.items():
        for target, line in _imports(module, tree):
            why = rule(module, target)
            if why:
                bad.append(f"{path.relative_to(REPO)}:{line}: {module} imports {target} ({why})")
    return bad


def _layer_rule(module: str, target: str) -> str | None:
    src, dst = _layer(module), _layer(target)
    if dst not in ("ssl_container", "eval", "launch", "study", "front"):
        return None  # third-party or standard library
    if dst == "front" and src != "front":
        return "nothing below the front ends imports them"
    if dst == "study" and src not in ("study", "front"):
        return "only the front end imports the study app"
    if src == "study":
        return None  # the study app builds on the library, eval and launch
    if src == "ssl_container" and dst in ("eval", "launch"):
        return "the library never imports eval or launch"
    if src in ("eval", "launch") and dst not in ("ssl_container", src):
        return f"{src} builds on the library only"
    return None


def _package_rule(module: str, target: str) -> str | None:
    if not _within(target, "ssl_container"):
        return None
    if _within(module, "ssl_container.models") and not _within(target, "ssl_container.models"):
        return "models import nothing else of the project"
    if _within(module, "ssl_container.data") and _within(target, "ssl_container.models"):
        return "data never imports models"
    if _within(module, "ssl_container.utils") and not _within(target, "ssl_container.utils"):
        return "utils import nothing else of the project"
    if _within(module, "ssl_container.dino") and any(
            _within(target, f"ssl_container.{m}") for m in ("trainer", "train")):
        return "dino knows tensors, not engines"
    return None


# The library's own order, bottom up: a module imports its own part and the parts below it, never one above
# (issue 36 found config -> trainer, signals -> trainer, trainer -> downstream, all now gone). The trainer
# knows methods only through their registry and base class (test below). The package's
# __init__ is exempt: its lazy attributes (``ssl_container.load_backbone``, the model names) load a part when
# first asked for, the Python convention for a package's public names (docs/design.md).
LIBRARY_ORDER = (
    ("utils",),
    ("models", "data", "distributed", "signals"),
    ("dino",),
    ("config", "run_folder"),
    ("export",),
    ("methods",),
    ("trainer", "train"),
    ("downstream",),
)
_RANK = {part: rank for rank, parts in enumerate(LIBRARY_ORDER) for part in parts}


def _part(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == "ssl_container" and len(parts) > 1 else None


def _order_rule(module: str, target: str) -> str | None:
    src, dst = _part(module), _part(target)
    if module == "ssl_container" or src not in _RANK or dst not in _RANK or src == dst:
        return None
    if module == "ssl_container.config" and target.endswith(".config"):
        return None  # the run config composes every component's section, which lives beside its component
    if _RANK[dst] > _RANK[src]:
        return f"{src} sits below {dst} in the library's order"
    return None


def test_the_trainer_knows_methods_only_through_their_registry():
    bad = [f"{path.relative_to(REPO)}:{line}: {module} imports {target}"
           for module, (path, tree) in SOURCES.items() if _within(module, "ssl_container.trainer")
           for target, line in _imports(module, tree)
           if _within(target, "ssl_container.methods") and target not in ("ssl_container.methods",
                                                                          "ssl_container.methods.base")]
    bad += [f"{path.relative_to(REPO)}: names DINO's loss or head" for module, (path, tree) in SOURCES.items()
            if module == "ssl_container.trainer.run" for n in ast.walk(tree)
            if isinstance(n, ast.alias) and n.name in ("DINOLoss", "DINOHead", "koleo_loss", "MultiCropWrapper")]
    assert not bad, "the trainer must reach methods through ssl_container.methods (build_method) only:\n" + "\n".join(bad)


def _deepspeed_rule(module: str, target: str) -> str | None:
    if _within(target, "deepspeed") and module not in ("ssl_container.trainer.engine",
                                                       "ssl_container.trainer.checkpoint"):
        return "only trainer/engine.py and trainer/checkpoint.py import DeepSpeed"
    return None


@pytest.mark.parametrize("rule", [_layer_rule, _package_rule, _order_rule, _deepspeed_rule],
                         ids=["layers", "library-packages", "library-order", "deepspeed"])
def test_imports_follow_the_layers(rule):
    bad = _breaches(rule)
    assert not bad, "layering breaches:\n" + "\n".join(bad)


def test_no_import_cycles_between_modules():
    graph = {m: {t for t, _ in _imports(m, tree) if t in SOURCES and t != m} for m, (_, tree) in SOURCES.items()}
    # A package's __init__ re-exporting its own modules is not a cycle of design.
    for m in graph:
        graph[m] = {t for t in graph[m] if not (SOURCES[t][0].name == "__init__.py" and _within(m, t))}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_only_distributed_reads_rank_variables():
    bad = []
    for module, (path, tree) in SOURCES.items():
        if not _within(module, "ssl_container") or module == "ssl_container.distributed":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and RANK_VARIABLES.match(node.value):
                bad.append(f"{path.relative_to(REPO)}:{node.lineno}: {module} names {node.value!r}")
    assert not bad, "only ssl_container/distributed.py reads the rank environment:\n" + "\n".join(bad)


def test_the_rules_catch_a_breach():
    # The checker itself: a library module importing eval, and models importing data, are caught.
    assert _layer_rule("ssl_container.train", "eval.knn")
    assert _layer_rule("launch.submit", "ssl_container.cli")
    assert _package_rule("ssl_container.models.container", "ssl_container.export")
    assert _package_rule("ssl_container.data.stream", "ssl_container.models")
    assert _deepspeed_rule("ssl_container.train", "deepspeed.ops")
    assert _package_rule("ssl_container.utils.files", "ssl_container.config")
    assert _order_rule("ssl_container.config", "ssl_container.trainer.trackers")
    assert not _order_rule("ssl_container.config", "ssl_container.methods.config")
    assert _order_rule("ssl_container.methods.dino", "ssl_container.trainer.engine")
    assert _order_rule("ssl_container.trainer.knn_monitor", "ssl_container.downstream.visualize")
    assert _order_rule("ssl_container.signals", "ssl_container.run_folder")
    assert not _order_rule("ssl_container.trainer.run", "ssl_container.config")
    assert not _layer_rule("ssl_container.cli.demo", "eval.protocol")
    assert _layer_rule("eval.knn", "study.runner")
    assert _layer_rule("ssl_container.train", "study.plan")
    assert not _layer_rule("study.runner", "launch.submit")


def test_no_module_imports_another_modules_private_names():
    bad = []
    for module, (path, tree) in SOURCES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module in SOURCES and node.module != module:
                bad += [f"{path.relative_to(REPO)}:{node.lineno}: {module} imports {node.module}.{a.name}"
                        for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, "private helpers used across modules (make them public or move them):\n" + "\n".join(bad)


def test_the_package_root_holds_at_most_ten_modules():
    root = sorted(p.name for p in (REPO / "ssl_container").glob("*.py"))
    assert len(root) <= 10, f"{len(root)} modules at the root of ssl_container (move some into a subpackage): {root}"


# Each component is built from its own section plus runtime values (torchtitan's component configs);
# only the run builder and the loop see the whole TrainConfig.
COMPONENTS = ("ssl_container.trainer.engine", "ssl_container.trainer.checkpoint", "ssl_container.dino.loss",
              "ssl_container.data.stream", "ssl_container.trainer.knn_monitor")


@pytest.mark.parametrize("module", COMPONENTS)
def test_components_take_their_own_config_section(module):
    path, tree = SOURCES[module]
    uses = [n.lineno for n in ast.walk(tree)
            if (isinstance(n, ast.Name) and n.id == "TrainConfig") or (isinstance(n, ast.alias) and n.name == "TrainConfig")]
    assert not uses, f"{path.relative_to(REPO)} lines {uses} take the whole TrainConfig: give it its own section"


def _functions(package: str):
    for module, (path, tree) in SOURCES.items():
        if _within(module, package):
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{path.relative_to(REPO)}:{node.lineno} {node.name}", node.end_lineno - node.lineno + 1


def test_the_loop_reads_on_one_screen_and_no_trainer_function_outgrows_one():
    lengths = dict(_functions("ssl_container.trainer"))
    loop = {k: v for k, v in lengths.items() if k.endswith(" _train") or k.endswith(" train")}
    assert loop and all(v <= 60 for v in loop.values()), loop
    long = {k: v for k, v in lengths.items() if v > 60}
    assert not long, f"trainer functions over 60 lines: {long}"
