import os
import sys

# One thread per process: the tiny models are overhead-bound, and the tests start subprocesses
# (sample.py, torchrun with 2 ranks) that would otherwise oversubscribe a 2-core machine, where
# waiting threads made the same work up to 20x slower. Set before torch is imported; inherited.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory):
    """A random-init tiny Wan saved in the real diffusers format (built once per test session)."""
    from causal_wan import make_tiny_wan
    return make_tiny_wan(str(tmp_path_factory.mktemp("models") / "tiny_wan"))
