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
