"""Build script: the pure-Python package always; the C++/CUDA extension only with FORCE_CUDA=1 or a visible GPU.

The extension build honours TORCH_CUDA_ARCH_LIST and MAX_JOBS (read by torch.utils.cpp_extension) and uses ninja.
Install with ``pip install -e . --no-build-isolation`` so the build sees the installed torch.
"""

import glob
import os

from setuptools import find_packages, setup


def extension_build():
    """``(ext_modules, cmdclass)`` for the CUDA extension, or empty ones when it is not requested."""
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        print("spinenet_fast: torch is not importable at build time; building without the CUDA extension")
        return [], {}
    if os.environ.get("FORCE_CUDA", "0") != "1" and not torch.cuda.is_available():
        print("spinenet_fast: no GPU and FORCE_CUDA!=1; building without the CUDA extension")
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    extension = CUDAExtension(
        name="spinenet_fast._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
        py_limited_api=False,
    )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_build()
setup(
    packages=[*find_packages(include=["spinenet_fast", "spinenet_fast.*"]), "spinenet_fast.kernels"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
