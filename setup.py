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

import datetime
import os
import shutil
import subprocess

from setuptools import setup

# -ffp-contract=off: no implicit a*b+c -> FMA; the kernels place every FMA where torch's own kernels
# have one, so that results round as torch's do. -fno-math-errno lets sqrt vectorize. -g0: no
# debug info (Python's flags add -g): it was a third of the build's CPU time (plan.cpp 25 -> 15 s,
# the longest update file 16 -> 10 s on the 2-core machine, 2026-12-05); symbols stay.
CXX_FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-g0"]
# -fmad=false: the CUDA twin of -ffp-contract=off.
NVCC_FLAGS = ["-O3", "-fmad=false"]
# The GPU architectures a CUDA build holds machine code for, without TORCH_CUDA_ARCH_LIST: A100,
# A10/RTX 30, L4/L40/RTX 40, H100/H200, B200, RTX 50; PTX for the newest. The wheels that
# scripts/wheel_cuda.sh builds hold exactly these (scripts/wheel_check.py checks; issue 23).
CUDA_ARCHS = ("8.0", "8.6", "8.9", "9.0", "10.0", "12.0")


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


def _set_cuda_home():
    """Where CUDA_HOME and CUDA_PATH are unset, torch takes the folder above the folder of the
    `nvcc` on PATH. Where that nvcc is a wrapper script (/usr/local/bin/nvcc exec'ing
    /usr/local/cuda-13.0/bin/nvcc, as on the development machine), that is /usr/local, which has
    no lib64/libcudart.so: the CUDA library compiled and then failed to link (`cannot find
    -lcudart`, issue 23). nvcc itself says where its toolkit is (TOP in its --dryrun output): use
    that, before torch.utils.cpp_extension reads the variable."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-E", "-x", "cu", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ TOP="):
            top = os.path.realpath(line.split("=", 1)[1].strip())
            if os.path.isdir(os.path.join(top, "bin")):
                os.environ["CUDA_HOME"] = top
            return


def _nvcc_threads(arch_list):
    """nvcc --threads: how many of one file's architectures it compiles at once. A wheel's six
    architectures made update_rmsprop.cu one 54.5 s compile step of 165.5 s in all (2-core
    machine, 2026-12-05): on many cores that one file was the build's length. One thread per 4
    cores, at most one per architecture: none on 2 cores (measured there: 92.0 s with
    --threads 2 against 93.1 s without, the same SASS sizes:
    benchmarks/results/wheel_cuda_threads_2026-12-05.txt), 4 on the 16-core GPU machine.
    FUSEDOPT_NVCC_THREADS overrides it."""
    if os.environ.get("FUSEDOPT_NVCC_THREADS"):
        return int(os.environ["FUSEDOPT_NVCC_THREADS"])
    archs = [a for a in arch_list.replace(" ", ";").split(";") if a]
    return max(1, min(len(archs), (os.cpu_count() or 1) // 4))


def _default_cuda_archs(cuda_home):
    """Without TORCH_CUDA_ARCH_LIST: CUDA_ARCHS that this nvcc knows, with PTX for the newest
    (so later GPUs can JIT it)."""
    wanted = list(CUDA_ARCHS)
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        known = {a.split("_")[1] for a in out.split() if a.startswith("compute_")}
        wanted = [a for a in wanted if a.replace(".", "") in known] or wanted[:4]
    except (OSError, subprocess.TimeoutExpired):
        wanted = wanted[:4]
    return ";".join(wanted[:-1] + [wanted[-1] + "+PTX"])


def _git_commit():
    if os.environ.get("FUSEDOPT_BUILD_COMMIT"):  # a build from a copy of the tree, without .git
        return os.environ["FUSEDOPT_BUILD_COMMIT"]
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=30,
                cwd=HERE,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.TimeoutExpired):
        return None


def _write_build_info(torch, cuda_archs):
    """fusedopt/_build_info.py: what the compiled libraries were built against, for
    `python -m fusedopt.info` and the check that refuses a library built for another torch."""
    info = {
        "version": VERSION_BASE,
        "torch": torch.__version__.split("+")[0],
        "cuda": torch.version.cuda if cuda_archs else None,
        "cuda_archs": cuda_archs,
        "commit": _git_commit(),
        "built": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    with open(os.path.join(HERE, "fusedopt", "_build_info.py"), "w") as f:
        f.write('"""Written by setup.py when the native libraries are built."""\n\n')
        f.write(f"BUILD = {info!r}\n")
    return info


def _local_version(torch, cuda):
    """The wheel's local version tag: the CUDA and torch it was built for (+cu130torch2.11)."""
    torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if cuda:
        return f"cu{torch.version.cuda.replace('.', '')}torch{torch_mm}"
    return f"cpu.torch{torch_mm}"


def _one_ninja_build(BuildExtension):
    """torch's BuildExtension, with the object files of every library compiled by one ninja run
    (MAX_JOBS jobs over all of them), then each library linked. BuildExtension itself builds one
    library after the other, each its own ninja run: the CUDA library's longest file waited for
    the CPU library's (issue 22). _run_ninja_build is torch's private function: without it, the
    libraries build one after the other as before."""

    class OneNinjaBuild(BuildExtension):
        def build_extension(self, ext):
            # Each library's objects and build.ninja in a folder of its own.
            build_temp = self.build_temp
            self.build_temp = os.path.join(build_temp, ext.name)
            try:
                super().build_extension(ext)
            finally:
                self.build_temp = build_temp

        def build_extensions(self):
            from torch.utils import cpp_extension

            run_ninja = getattr(cpp_extension, "_run_ninja_build", None)
            if len(self.extensions) < 2 or not self.use_ninja or run_ninja is None:
                super().build_extensions()
                return
            # torch writes each library's build.ninja and runs it, then links the library:
            # record both instead, then run one ninja over all the build files and link.
            subninjas, links = [], []
            cpp_extension._run_ninja_build = lambda dir_, *_, **__: subninjas.append(dir_)
            self.compiler.link_shared_object = lambda *a, **k: links.append((a, k))
            try:
                super().build_extensions()
            finally:
                cpp_extension._run_ninja_build = run_ninja
                del self.compiler.link_shared_object  # the compiler class's own again
            top = os.path.join(self.build_temp, "all")
            os.makedirs(top, exist_ok=True)
            with open(os.path.join(top, "build.ninja"), "w") as f:
                f.writelines(f"subninja {os.path.join(d, 'build.ninja')}\n" for d in subninjas)
            run_ninja(top, True, "Error compiling objects")
            for args, kwargs in links:  # about a second each
                self.compiler.link_shared_object(*args, **kwargs)

    return OneNinjaBuild


def extensions():
    import torch

    _set_cuda_home()
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    include = [os.path.join(HERE, "csrc", "include")]
    exts = [
        CppExtension(
            "fusedopt._C",
            [
                "csrc/binding.cpp",
                "csrc/plan.cpp",
                "csrc/cpu/update.cpp",
                "csrc/cpu/update_adam.cpp",
                "csrc/cpu/update_rmsprop.cpp",
                "csrc/cpu/update_sgd.cpp",
                "csrc/cpu/sumsq.cpp",
            ],
            include_dirs=include,
            # at::parallel_for is a header template: without OpenMP it runs on one thread. The
            # libgomp.so.1 it links is the one torch already loaded (same soname): one runtime.
            extra_compile_args={"cxx": CXX_FLAGS + ["-fopenmp"]},
            extra_link_args=["-fopenmp"],
        )
    ]
    cuda = _want_cuda(torch.version.cuda, CUDA_HOME)
    archs = None
    if cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = _default_cuda_archs(CUDA_HOME)
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    _write_build_info(torch, archs)
    if cuda:
        exts.append(
            CUDAExtension(
                "fusedopt._cuda",
                [
                    "csrc/cuda/binding.cpp",
                    "csrc/cuda/update.cu",
                    "csrc/cuda/update_adam.cu",
                    "csrc/cuda/update_rmsprop.cu",
                    "csrc/cuda/update_sgd.cu",
                    "csrc/cuda/sumsq.cu",
                ],
                include_dirs=include,
                extra_compile_args={
                    "cxx": CXX_FLAGS,
                    "nvcc": NVCC_FLAGS + ["--threads", str(_nvcc_threads(archs))],
                },
            )
        )
    return (
        exts,
        {"build_ext": _one_ninja_build(BuildExtension).with_options(no_python_abi_suffix=True)},
        _local_version(torch, cuda),
    )


VERSION_BASE = "0.1.0"
HERE = os.path.dirname(os.path.abspath(__file__))
ext_modules, cmdclass, local = extensions()

setup(
    name="fusedopt",
    version=f"{VERSION_BASE}+{local}",
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
