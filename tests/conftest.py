"""Test setup. Without a GPU, Triton runs through its interpreter on CPU tensors: that must be
switched on before triton is imported anywhere, so it happens here, first.

Hypothesis profiles (tests/test_properties.py): "ci", the default, draws a few examples per test,
reproducibly (derandomize) and writes no example database; "long" (`--hypothesis-profile=long`,
hypothesis' own pytest option) draws thousands per test from fresh random seeds."""
import os
import glob

if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

_SLOW_DRAWS = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_SLOW_DRAWS, print_blob=True)
settings.register_profile("long", max_examples=1000, deadline=None, derandomize=False, database=None,
                          suppress_health_check=_SLOW_DRAWS, print_blob=True)
settings.load_profile("ci")  # hypothesis' pytest plugin loads --hypothesis-profile after this


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none visible on this machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `in keywords`: that matches folder names
            item.add_marker(skip_gpu)
