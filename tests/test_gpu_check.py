"""The CPU-independent parts of scripts/gpu_check.py (the GPU run itself has not run yet)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import gpu_check  # noqa: E402


def test_modes_cover_the_matrix():
    names = [m[0] for m in gpu_check.modes(zero=True)]
    assert len(names) == len(set(names)) == 3 * 4 * 2 * 3
    assert any("per_param-fp16-overlap-offload" == n for n in names)


@pytest.mark.parametrize("name", ["global-fp32-no_overlap-plain", "per_param-fp32-overlap-plain", "value-bf16_sr-overlap-plain"])
def test_cpu_mode_matches_its_reference(name):
    (mode,) = [m for m in gpu_check.modes(zero=False) if m[0] == name]
    result = gpu_check.check_mode(*mode, device="cpu")
    assert result["ok"], result
    assert result["syncs"] == -1  # no CUDA: not counted
