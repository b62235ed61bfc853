"""Build the Cython supervoxel kernel in place.

    python data/supervoxels/setup.py build_ext --inplace

(``bash scripts/setup.sh`` runs this.) It produces ``data/supervoxels/felzenszwalb_3d_cy*.so``,
importable as ``data.supervoxels.felzenszwalb_3d_cy``, whatever folder it is run from.
"""
import filecmp
import os
import shutil
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

REPO_ROOT = Path(__file__).resolve().parents[2]
os.chdir(REPO_ROOT)  # the dotted module name below places the --inplace output under data/

extension = Extension(
    "data.supervoxels.felzenszwalb_3d_cy",
    ["data/supervoxels/felzenszwalb_3d_cy.pyx"],
    # -ffp-contract=off: costs and thresholds must round exactly like NumPy's float64 operations
    extra_compile_args=["-O3", "-ffp-contract=off"],
)



class InplaceBuildExt(build_ext):
    """build_ext whose --inplace copy never rewrites a loaded extension in place.

    setuptools copies the built library over the in-place one on every run, truncating the file
    first; a process that has it loaded (a test run beside a set-up run) could then crash. Here an
    identical file is left alone and a changed one is replaced by an atomic rename.
    """

    def copy_file(self, infile, outfile, *args, **kwargs):
        if os.path.exists(outfile) and filecmp.cmp(infile, outfile, shallow=False):
            return outfile, False
        tmp = f"{outfile}.tmp{os.getpid()}"
        shutil.copyfile(infile, tmp)
        shutil.copymode(infile, tmp)
        os.replace(tmp, outfile)
        return outfile, True


setup(
    name="qamp-supervoxels",
    ext_modules=cythonize([extension], language_level=3, quiet=True),
    cmdclass={"build_ext": InplaceBuildExt},
    zip_safe=False,
)
