"""Shared test fixtures."""
import signal
import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread avoids OpenMP barriers stalling on a busy shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def clustered(n: int, dim: int, num_classes: int, noise: float, seed: int, centre_seed: int = 1234):
    """Class centres + noise: realistic (clustered) features where exact ties are improbable."""
    centres = np.random.default_rng(centre_seed).standard_normal((num_classes, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    return (centres[y] + noise * rng.standard_normal((n, dim))).astype(np.float32), y


# A suite started in the background by a shell without job control (`cmd &`, nohup) inherits SIGINT
# ignored, and so would every trainer it starts, which then rightly leaves that signal alone. The tests of
# the SIGINT stop need the disposition a terminal or a CI job gives: a handler here resets to the default
# in every child at exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
