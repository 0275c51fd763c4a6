"""``ssl-container models``: the stored table it prints at the default sizes is what the models measure,
it lists the demo's container_light_narrow, and it answers without importing torch."""
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_stored_table_is_what_the_models_measure():
    from ssl_container.cli import MODELS_TABLE
    from ssl_container.models.info import describe_models

    stored = json.loads(MODELS_TABLE.read_text())
    assert describe_models(stored["sizes"]) == stored["rows"]
    assert [r["model"] for r in stored["rows"]][-1] == "container_light_narrow"


def test_models_answers_at_once_and_lists_the_demo_network():
    code = ("import sys, runpy; sys.argv = ['ssl-container', 'models']; "
            "from ssl_container.cli import main; main(); print('torch' in sys.modules)")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert time.perf_counter() - t0 < 5
    assert "container_light_narrow       1,302,291       0.254       0.046" in out
    assert out.strip().splitlines()[-1] == "False"  # torch was never imported
    other = subprocess.run([sys.executable, "-m", "ssl_container", "models", "--sizes", "64", "--json"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout
    rows = {r["model"]: r for r in json.loads(other)}
    assert rows["container_light_narrow"]["gmacs"]["64"] == 0.0206  # measured, not stored
