"""Test setup. TRITON_INTERPRET must be set before triton (or kernels/) is imported, so that the
Triton kernels run on CPU tensors through the interpreter."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# The kernels' parity properties draw a few cases in the README's quick run and many where CI runs them
# again (HYPOTHESIS_PROFILE=thorough, in .ci/run); the fixed @example cases run in both.
settings.register_profile("quick", max_examples=4, deadline=None, print_blob=True)
settings.register_profile("thorough", max_examples=12, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))


@pytest.fixture
def torch_path(monkeypatch):
    """Run kernels.* through the plain PyTorch path (fast model tests on CPU)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny tensors on a shared 2-core machine gain nothing from more, and the
    Inception net runs ~10x slower with two threads there."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
