"""The house rules a linter can check, on every file of the project: ruff (the rules in pyproject.toml:
undefined and unused names, shadowed imports, syntax), and no fault switch read from the environment
by production code (faults are injected by the tests, from tests/faults)."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCTION = ("ssl_container", "launch", "eval")


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    proc = subprocess.run([ruff, "check", "--no-cache", "ssl_container", "launch", "eval", "benchmarks", "tests"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_production_code_reads_no_fault_switches():
    pattern = re.compile(r"""environ(?:\.get)?\s*[\[(]\s*["'][A-Z_]*(FAULT|INJECT|TEST_)[A-Z_]*["']""")
    hits = [f"{p.relative_to(REPO)}:{n}" for top in PRODUCTION for p in sorted((REPO / top).rglob("*.py"))
            for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, f"fault switches in production code (inject them from tests/faults instead): {hits}"
