"""retain_freed_memory: after one step, repeating it takes no page faults (glibc)."""
import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator switch is glibc's mallopt")

# Allocate and free a 64 MiB tensor (above glibc's largest mmap threshold) 5 times after a warm-up
# and count the minor page faults: 16,384 pages each time if the memory went back to the kernel.
_PROBE = """
import json, resource, sys, torch
from ssl_container.utils.runtime import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(16 * 2**20)
# Steady state: an aligned request first needs a free block a little larger than the last, so the
# heap walks up 64 MiB at a time for up to ~11 rounds (varying with the run) before it settles.
for _ in range(20):
    y = x * 2; del y
before = faults()
for _ in range(5):
    y = x * 2; del y
print(json.dumps({"applied": applied, "faults": faults() - before, "again": retain_freed_memory() if applied else None}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_page_faults():
    default = _probe("default")
    retained = _probe("retain")
    assert default["faults"] >= 5 * 16_000  # the kernel hands out fresh zeroed pages every time
    assert retained["applied"] is True and retained["again"] is True  # idempotent
    assert retained["faults"] < 100
