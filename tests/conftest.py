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


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One data cache per test module: building the corpus and tokenizer is the slow part of a run."""
    return tmp_path_factory.mktemp("cache")
