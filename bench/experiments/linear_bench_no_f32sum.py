"""``linear_bench.py`` with the fused pass's f32 sum of ``grad_hidden`` over blocks of the
vocabulary refused (``xent.torch.linear._f32_sum_fits`` answers False, as the package did
before session 62): the other side of that change's A/B. Run from beside ``linear_bench.py``
with the same arguments."""

import os
import runpy
import sys

import xent.torch.linear as linear

linear._f32_sum_fits = lambda *args: False
sys.argv[0] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "linear_bench.py")
runpy.run_path(sys.argv[0], run_name="__main__")
