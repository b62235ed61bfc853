"""Build the Cython supervoxel kernel in place.

    python data/supervoxels/setup.py build_ext --inplace

(``bash scripts/setup.sh`` runs this.) It produces ``data/supervoxels/felzenszwalb_3d_cy*.so``,
importable as ``data.supervoxels.felzenszwalb_3d_cy``, whatever folder it is run from.
"""
import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

REPO_ROOT = Path(__file__).resolve().parents[2]
os.chdir(REPO_ROOT)  # the dotted module name below places the --inplace output under data/

extension = Extension(
    "data.supervoxels.felzenszwalb_3d_cy",
    ["data/supervoxels/felzenszwalb_3d_cy.pyx"],
    # -ffp-contract=off: costs and thresholds must round exactly like NumPy's float64 operations
    extra_compile_args=["-O3", "-ffp-contract=off"],
)

setup(
    name="qamp-supervoxels",
    ext_modules=cythonize([extension], language_level=3, quiet=True),
    zip_safe=False,
)
