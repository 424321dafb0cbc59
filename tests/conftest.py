import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # for reference_crate
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))  # for cratebench, the benchmark harness


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_leaked_torch_state():
    """Every test leaves torch's process-wide settings as it found them (use ``torch_threads`` to change threads)."""
    before = (torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled())
    yield
    after = (torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled())
    assert after == before, f"the test changed torch's (threads, default dtype, grad mode) from {before} to {after}"


@pytest.fixture
def torch_threads():
    """``torch_threads(n)`` sets torch's intra-op thread count for the rest of the test; restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)
