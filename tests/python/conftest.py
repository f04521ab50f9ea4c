"""pytest configuration for the Python package's tests (run by scripts/test.sh).

The tests import the installed package (``pip install .``), never the source tree, so that what
is tested is what a user gets.
"""

import os
import sys

import pytest

# Run from the repository root, "python/" must not shadow the installed package.
_here = os.path.dirname(os.path.abspath(__file__))
_src = os.path.normpath(os.path.join(_here, "..", "..", "python"))
sys.path[:] = [p for p in sys.path if os.path.normpath(os.path.abspath(p or ".")) != _src]


@pytest.fixture(autouse=True)
def _fixed_seed():
    try:
        import torch
    except ImportError:  # the NumPy-only tests
        return
    torch.manual_seed(0)
