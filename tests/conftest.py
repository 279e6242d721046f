"""Suite-wide settings: the in-process tests use tiny tensors, for which torch's thread pool only adds
overhead (6x slower on a loaded 2-core machine); subprocesses (torchrun, bench) choose their own."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
