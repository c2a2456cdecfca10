import os
import sys

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run, CI included: a failure reproduces, and the
# suite's time does not vary. (Tests still choose their own max_examples.)
settings.register_profile("morphnet", derandomize=True)
settings.load_profile("morphnet")

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def one_thread():
    """Big models on a shared 2-core machine: one thread avoids spin-waiting between threads
    (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
