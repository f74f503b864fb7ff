"""Test setup. Without a GPU, Triton runs through its interpreter on CPU tensors: that must be
switched on before triton is imported anywhere, so it happens here, first."""
import os
import glob

if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none visible on this machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `in keywords`: that matches folder names
            item.add_marker(skip_gpu)
