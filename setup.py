"""Native extensions. Each is optional: if the compiler fails, neoxja falls back to pure Python/PyTorch
code that gives the same results, so `pip install` never breaks on a machine without a C compiler."""
import os

from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
FLAGS = ["-O3", "-march=native", "-fno-strict-aliasing"]

CANDIDATES = [
    # (module name, sources, extra compile args, extra link args)
    ("neoxja.tokenization._abeja_native", ["src/neoxja/tokenization/_abeja_native.c"], FLAGS, []),
    ("neoxja._kernels", ["src/neoxja/_kernels.c"], FLAGS + ["-fopenmp"], ["-fopenmp"]),
]

ext_modules = [
    Extension(name, sources, extra_compile_args=cflags, extra_link_args=lflags, optional=True)
    for name, sources, cflags, lflags in CANDIDATES
    if all(os.path.exists(os.path.join(HERE, s)) for s in sources)
]

setup(ext_modules=ext_modules)
