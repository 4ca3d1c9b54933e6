import ctypes
import ctypes.util
import gc
import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # the helpers beside the tests: reference.py, hub_server.py, parquet_shards.py


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; reported as skipped where there is none")
    config.addinivalue_line("markers", "slow: a large model or a long run; part of CI all the same")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# glibc keeps freed heap pages: without giving them back after each test, a full run grew to 19 GB (the large
# architectures' tensors fragment the heap), leaving the ViT-L/14 tests 3.6 GB on a 24 GB machine with no swap
_libc = ctypes.CDLL(ctypes.util.find_library("c"))
_malloc_trim = getattr(_libc, "malloc_trim", None)  # glibc only


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(autouse=True)
def _return_freed_memory():
    yield
    if _malloc_trim is None:
        return
    if _resident_bytes() > 2 << 30:  # gc.collect costs ~0.2 s with torch loaded: only where a large model was
        gc.collect()  # tensors kept by reference cycles (a failed test's traceback) are freed first
    _malloc_trim(0)


@pytest.fixture
def tmp_path(tmp_path):
    """pytest's tmp_path, emptied when the test ends: the nine architectures' checkpoints in three containers
    (RN50x64 and ViT-L/14 are 1.7 GB each in fp32) took 32 GB of /tmp when every test kept its own until the run ended."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")
