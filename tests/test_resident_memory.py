"""peak_resident_bytes: a process's own peak, not the one it inherits from the process that started it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from aria_jax.resident_memory import peak_resident_bytes

CHILD = """
import json, resource
import numpy as np
from aria_jax.resident_memory import peak_resident_bytes
before = peak_resident_bytes()
held = np.ones(300 * 2**20 // 8)  # 300 MiB, touched
print(json.dumps({"before": before, "after": peak_resident_bytes(),
                  "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def test_a_child_of_a_large_process_reports_its_own_peak():
    held = np.ones(1024 * 2**20 // 8)  # this process holds 1 GiB more than the child ever will
    assert peak_resident_bytes() >= held.nbytes
    child = json.loads(subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout)
    assert child["ru_maxrss"] >= held.nbytes  # what getrusage inherits, and why it is not used
    assert child["before"] < held.nbytes / 2
    assert child["after"] - child["before"] >= 300 * 2**20 * 0.95
