import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py, tests/hub_server.py

from reference import reference_model  # noqa: E402


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


@pytest.fixture
def tmp_path(tmp_path):
    """pytest's tmp_path, emptied when the test ends: the nine architectures' checkpoints in three containers
    (RN50x64 and ViT-L/14 are 1.7 GB each in fp32) took 32 GB of /tmp when every test kept its own until the run ended."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")
