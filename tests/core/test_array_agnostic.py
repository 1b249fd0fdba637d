"""The CuPy code paths, run without a GPU on a strict stand-in for CuPy (tests/strict_cupy).

The ``gpu`` tests are run in a subprocess with the stand-in first on ``PYTHONPATH``: its arrays
refuse implicit conversion to NumPy and refuse to mix with NumPy arrays, as CuPy's do. A host
array that reaches a device kernel, or a device block that reaches Zarr, fails here as it
does on a GPU (before the fixes of December 2026 the same 8 compressions failed on the
stand-in and on an H200). CUDA's numerics are checked only on a real device.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_paths_on_a_strict_cupy_stand_in():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "tests" / "strict_cupy"), *filter(None, [env.get("PYTHONPATH")])]
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/core/test_gpu.py",
            "tests/core/test_single_pass.py",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    # the kernels of every kind and width, and every CuPy-backed compression: not skipped
    assert passed and int(passed.group(1)) >= 150, tail
