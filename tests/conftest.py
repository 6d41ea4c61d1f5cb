import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory):
    """A random-init tiny Wan saved in the real diffusers format (built once per test session)."""
    from causal_wan import make_tiny_wan
    return make_tiny_wan(str(tmp_path_factory.mktemp("models") / "tiny_wan"))
