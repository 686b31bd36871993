import os

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run, so a run (CI's included) passes or fails on the
# code alone. `HYPOTHESIS_PROFILE=explore` draws new ones: searching that way found the two corner
# cases listed in docs/testing.md.
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


def pytest_generate_tests(metafunc):
    # Every test taking `device` runs on each device; the CUDA case skips without a GPU.
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fused_kernel_stays_compiled():
    # A failed compile switches the fused update off for the rest of the process (by design, with one
    # warning): a test that caused one would silently move every later test onto the fallback path.
    yield
    from refadamw.kernels import fused

    assert not fused._compile_failed, "this test made torch.compile of the fused update fail"
