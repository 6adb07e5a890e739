"""fusedopt: fused torch.optim-compatible optimizers.

The Triton kernels in kernels/ are installed as ``fusedopt.kernels`` (never as a top-level
``kernels`` package). The native kernels in csrc/ build into two libraries that
``fusedopt/backends/native.py`` loads with ``torch.ops.load_library``:

- ``fusedopt._C``: the op schemas and the CPU kernels. Always built.
- ``fusedopt._cuda``: the CUDA kernels. Built when torch has CUDA and nvcc is found;
  ``FUSEDOPT_BUILD_CUDA=1`` forces it (and fails if it cannot be built), ``=0`` skips it.
  ``TORCH_CUDA_ARCH_LIST`` selects the GPU architectures, as for any torch extension.

Build with ``pip install --no-build-isolation .``: the build needs the installed torch (an isolated
build would download another, with several GB of CUDA packages).
"""

import os

from setuptools import setup

# -ffp-contract=off: no implicit a*b+c -> FMA; the kernels place every FMA where torch's own kernels
# have one, so that results round as torch's do. -fno-math-errno lets sqrt vectorize.
CXX_FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off"]
# -fmad=false: the CUDA twin of -ffp-contract=off.
NVCC_FLAGS = ["-O3", "-fmad=false"]


def _want_cuda(torch_cuda_available, cuda_home):
    flag = os.environ.get("FUSEDOPT_BUILD_CUDA", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        if not (torch_cuda_available and cuda_home):
            raise RuntimeError(
                "FUSEDOPT_BUILD_CUDA=1 but the CUDA extension cannot be built: "
                f"torch.version.cuda={torch_cuda_available!r}, CUDA_HOME={cuda_home!r}"
            )
        return True
    return bool(torch_cuda_available and cuda_home)


def extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    here = os.path.dirname(os.path.abspath(__file__))
    include = [os.path.join(here, "csrc", "include")]
    exts = [
        CppExtension(
            "fusedopt._C",
            ["csrc/binding.cpp", "csrc/cpu/adam.cpp", "csrc/cpu/rmsprop.cpp", "csrc/cpu/sumsq.cpp"],
            include_dirs=include,
            # at::parallel_for is a header template: without OpenMP it runs on one thread. The
            # libgomp.so.1 it links is the one torch already loaded (same soname): one runtime.
            extra_compile_args={"cxx": CXX_FLAGS + ["-fopenmp"]},
            extra_link_args=["-fopenmp"],
        )
    ]
    if _want_cuda(torch.version.cuda, CUDA_HOME):
        exts.append(
            CUDAExtension(
                "fusedopt._cuda",
                [
                    "csrc/cuda/binding.cpp",
                    "csrc/cuda/adam.cu",
                    "csrc/cuda/rmsprop.cu",
                    "csrc/cuda/sumsq.cu",
                ],
                include_dirs=include,
                extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            )
        )
    return exts, {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = extensions()

setup(
    name="fusedopt",
    version="0.1.0",
    description="Fused multi-tensor Adam, AdamW and RMSprop for PyTorch, with in-kernel Noam lr",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fusedopt", "fusedopt.backends", "fusedopt.kernels"],
    package_dir={"fusedopt": "fusedopt", "fusedopt.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton>=3.0"], "test": ["pytest", "numpy"]},
)
