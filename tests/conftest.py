"""Shared fixtures. Floating-point errors raise in tests (np.seterr('raise'))."""
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"

os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".venv" / "numba-cache"))


@pytest.fixture(autouse=True)
def _raise_on_fp_errors():
    old = np.seterr(all="raise", under="ignore")
    yield
    np.seterr(**old)
