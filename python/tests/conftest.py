"""Makes ``import xent`` take the installed wheel: ``python -m pytest`` run from ``python/`` puts
the source tree first on ``sys.path``, whose ``xent`` has no compiled extension unless
``maturin develop`` put one there; then the source tree is taken off the path."""

import os
import sys


def _installed_xent_first():
    try:
        import xent._xent
    except ModuleNotFoundError as err:
        if err.name != "xent._xent":
            raise
        source_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        for name in [m for m in sys.modules if m == "xent" or m.startswith("xent.")]:
            del sys.modules[name]
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != source_root]
        import xent._xent
    return xent._xent


_installed_xent_first()


try:
    import pytest

    import xent.torch.linear as _linear
except ImportError:  # NumPy-only runs (no torch)
    _linear = None

if _linear is not None:
    # The shipped threshold, for the test that checks it.
    SKIP_MIN_PRODUCTS = _linear._SKIP_MIN_PRODUCTS

    @pytest.fixture(autouse=True)
    def _small_calls_skip_ignored_rows(monkeypatch):
        """The tests' shapes are far below ``_SKIP_MIN_PRODUCTS``, under which ``skip_ignored``
        computes every row: every test takes the scored rows alone as large calls do (a test of
        the threshold itself sets it back)."""
        monkeypatch.setattr(_linear, "_SKIP_MIN_PRODUCTS", 0)
