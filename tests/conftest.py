import os
import sys

# One thread per process: the tiny models are overhead-bound, and the tests start subprocesses
# (sample.py, torchrun with 2 ranks) that would otherwise oversubscribe a 2-core machine, where
# waiting threads made the same work up to 20x slower. Set before torch is imported; inherited.
os.environ["OMP_NUM_THREADS"] = "1"

import socket  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory):
    """A random-init tiny Wan saved in the real diffusers format (built once per test session)."""
    from convert import make_tiny_wan
    return make_tiny_wan(str(tmp_path_factory.mktemp("models") / "tiny_wan"))



class EmaUpdates(list):
    """Every common.ema_update call of a training run: (EMA before, live weights, EMA after), each
    a list of full tensors (FSDP shards gathered)."""

    def check(self, start, decay):
        """--ema-start `start`: through update `start` the EMA equals the live weights exactly; after
        it, EMA = decay * EMA + (1 - decay) * live, which differs from the live weights."""
        for update, (before, live, after) in enumerate(self, 1):
            if update <= start:
                assert all(torch.equal(a, w)
                           for a, w in zip(after, live)), f"update {update}: the EMA is not the live weights"
            else:
                assert all(torch.allclose(a, decay * b + (1 - decay) * w, rtol=1e-5, atol=1e-7)
                           for b, w, a in zip(before, live, after)), f"update {update}: not the average"
                assert not all(torch.equal(a, w)
                               for a, w in zip(after, live)), f"update {update}: the EMA does not average"

    def check_start_and_resume(self, train, folder, start, decay):
        """train(out, *flags) runs a trainer with --ema-start `start` --ema-decay `decay`: 4 updates in
        one go pass check(); 1 update, then --resume to 4 (across the start), gives the same model and
        EMA bit for bit."""
        train(folder / "a", "--max-steps", 4)
        assert len(self) == 4
        self.check(start, decay)
        train(folder / "b", "--max-steps", 1)
        train(folder / "b", "--max-steps", 4, "--resume")
        a, b = (torch.load(folder / d / "ckpt.pt", weights_only=True) for d in "ab")
        for key in ("model", "ema"):
            assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


@pytest.fixture
def ema_updates(monkeypatch):
    """Records the ema_update calls of the runs in a test (EmaUpdates)."""
    import common
    real, calls = common.ema_update, EmaUpdates()

    def weights(model):
        return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in model.parameters()]

    def spy(ema, model, decay):
        before = weights(ema)
        real(ema, model, decay)
        calls.append((before, weights(model), weights(ema)))
    monkeypatch.setattr(common, "ema_update", spy)
    return calls


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(*argv, timeout=300):
    """`torchrun --nnodes 2 --nproc_per_node 1 --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID ARGV`
    started twice: two "nodes" of one process each on this machine (gloo), as on a cluster where every node runs
    the same command (README, "Multi-node"). Returns the two launchers' (returncode, output)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "test",
              *map(str, argv)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen(launch, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=timeout)[0] for node in nodes]
    return [(node.returncode, out) for node, out in zip(nodes, outputs)]
