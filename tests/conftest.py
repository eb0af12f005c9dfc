import os

import pytest
import torch

os.environ.setdefault("LOSSBOOK_QUIET", "1")
torch.set_num_threads(1)  # pytest-xdist runs one worker per core

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
