"""CUDA wheels (issue 23): the architecture list, the no-vendoring rule and the other checks of
scripts/wheel_check.py, on libraries and wheels made to pass and to break each rule; the reader
of a library's GPU code (fusedopt/_fatbin.py); and the refusal of a CUDA library built for
another CUDA. scripts/wheel_cuda.sh builds the real wheels and runs the same checker on them (CI
runs it: .ci/run)."""

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from fusedopt import _fatbin, info
from fusedopt.backends import native

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("wheel_check", ROOT / "scripts" / "wheel_check.py")
wheel_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wheel_check)

# What a wheel must hold (issue 23): SASS for A100, A10/RTX 30, L4/L40/RTX 40, H100/H200, B200,
# RTX 50, and PTX for the newest, so that later GPUs can compile it.
REQUIRED = "8.0;8.6;8.9;9.0;10.0;12.0+PTX"


def _nvcc():
    for c in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if c and os.access(c, os.X_OK):
            return c
    return None


def test_arch_list_is_the_required_one():
    assert wheel_check.default_arch_list() == REQUIRED
    assert wheel_check.parse_arch_list(REQUIRED) == ([80, 86, 89, 90, 100, 120], [120])


def test_setup_builds_every_required_arch_with_this_nvcc():
    """setup.py's default TORCH_CUDA_ARCH_LIST, with the nvcc CI has: nvcc 13 knows every arch,
    so none is dropped (an nvcc that does not know sm_120 would drop it)."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    tree = ast.parse((ROOT / "setup.py").read_text())
    (fn,) = [
        n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_default_cuda_archs"
    ]
    scope = {"os": os, "subprocess": subprocess, "CUDA_ARCHS": wheel_check.setup_cuda_archs()}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "setup.py", "exec"), scope)
    cuda_home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        pytest.skip(f"nvcc at {nvcc} is not inside a toolkit")
    assert scope["_default_cuda_archs"](cuda_home) == REQUIRED


def test_nvcc_threads(monkeypatch):
    """nvcc --threads for a many-arch build: one per 4 cores, at most one per arch."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_nvcc_threads"]
    scope = {"os": os}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "setup.py", "exec"), scope)
    threads = scope["_nvcc_threads"]
    monkeypatch.delenv("FUSEDOPT_NVCC_THREADS", raising=False)
    for cores, archs, want in (
        (2, REQUIRED, 1),
        (16, REQUIRED, 4),
        (64, REQUIRED, 6),
        (16, "9.0", 1),
    ):
        monkeypatch.setattr(os, "cpu_count", lambda c=cores: c)
        assert threads(archs) == want, (cores, archs)
    monkeypatch.setenv("FUSEDOPT_NVCC_THREADS", "3")
    assert threads(REQUIRED) == 3


def test_readme_names_the_excludes():
    readme = (ROOT / "README.md").read_text()
    for lib in wheel_check.EXCLUDES:
        assert re.search(rf"--exclude '?{re.escape(lib)}'?[ \n]", readme), lib


@pytest.fixture(scope="module")
def gpu_lib(tmp_path_factory):
    """A small shared library with two translation units of GPU code: the first for sm_80 and
    sm_90 with PTX for sm_90, the second for sm_90 only."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    d = tmp_path_factory.mktemp("gpu_lib")
    (d / "a.cu").write_text("__global__ void a(float* x) { x[threadIdx.x] *= 2.f; }\n")
    (d / "b.cu").write_text("__global__ void b(float* x) { x[threadIdx.x] += 1.f; }\n")
    both = [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=[sm_90,compute_90]",
    ]
    one = ["-gencode=arch=compute_90,code=sm_90"]
    for src, gencode in (("a", both), ("b", one)):
        subprocess.run(
            [
                nvcc,
                "-c",
                "-Xcompiler",
                "-fPIC",
                *gencode,
                "-o",
                str(d / f"{src}.o"),
                str(d / f"{src}.cu"),
            ],
            check=True,
            timeout=300,
        )
    # linked by the host compiler, as torch links an extension (`nvcc -shared` would add a
    # device-link image for its default arch, sm_75), leaving the CUDA runtime's symbols unresolved
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    for out, objs in (("lib.so", ["a.o", "b.o"]), ("a.so", ["a.o"])):
        subprocess.run(
            [cxx, "-shared", "-o", str(d / out), *(str(d / o) for o in objs)],  # cudart: unresolved
            check=True,
            timeout=300,
        )
    return d


def test_fatbin_reader(gpu_lib):
    units = _fatbin.fatbins(gpu_lib / "lib.so")
    assert sorted(sorted(u) for u in units) == [
        [("ptx", 90), ("sass", 80), ("sass", 90)],
        [("sass", 90)],
    ]
    # sm_80 and the PTX are in one translation unit only: b's kernel would not run on sm_80
    assert _fatbin.summary(gpu_lib / "lib.so") == {"sass": [90], "ptx": []}
    assert info._cuda_archs(str(gpu_lib / "a.so")) == "sm_80, sm_90 + PTX compute_90"
    assert _fatbin.fatbins(gpu_lib / "a.o")[0] == [("sass", 80), ("sass", 90), ("ptx", 90)]
    with pytest.raises(ValueError):
        _fatbin.fatbins(gpu_lib / "a.cu")


def _cuobjdump():
    """The CUDA toolkit's cuobjdump, else the one every NVIDIA Triton wheel bundles."""
    found = shutil.which("cuobjdump")
    try:
        import triton  # noqa: PLC0415 - only for its bundled tool

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        found = found or (str(bundled) if bundled.exists() else None)
    except ImportError:
        pass
    return found


def test_fatbin_reader_agrees_with_cuobjdump(gpu_lib):
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump here (scripts/wheel_cuda.sh confirms every wheel with one)")
    for lib, want in (("a.so", ([80, 90], [90])), ("lib.so", ([80, 90], [90]))):
        assert wheel_check.cuobjdump_archs(cuobjdump, str(gpu_lib / lib)) == want
        units = _fatbin.fatbins(gpu_lib / lib)
        assert (
            sorted({a for u in units for k, a in u if k == "sass"}),
            sorted({a for u in units for k, a in u if k == "ptx"}),
        ) == want


def test_check_archs(gpu_lib):
    units = _fatbin.fatbins(gpu_lib / "a.so")
    assert wheel_check.check_archs(units, [80, 90], [90]) == []
    (problem,) = wheel_check.check_archs(units, [80, 90, 120], [120])
    assert "missing ['ptx 120', 'sass 120']" in problem and "unexpected ['ptx 90']" in problem
    two = _fatbin.fatbins(gpu_lib / "lib.so")
    assert len(wheel_check.check_archs(two, [80, 90], [90])) == 1  # the second unit
    assert wheel_check.check_archs([], [80], []) == [
        "_cuda.so holds no GPU code (.nv_fatbin section)"
    ]


def test_check_linking():
    assert wheel_check.check_linking(["libc10.so", "libcudart.so.13", "libc.so.6"], "13.0") == []
    (static,) = wheel_check.check_linking(["libc10.so", "libc.so.6"], "13.0")
    assert "libcudart.so.13" in static
    (other,) = wheel_check.check_linking(["libc10.so", "libcudart.so.12"], "13.0")
    assert "libcudart.so.13" in other


def _fake_wheel(path, gpu_lib, name, extra=(), record=None):
    record = record or {
        "version": "0.1.0",
        "torch": "2.11.0",
        "cuda": "13.0",
        "cuda_archs": "8.0;9.0+PTX",
    }
    with zipfile.ZipFile(path / name, "w") as zf:
        zf.write(gpu_lib / "a.so", "fusedopt/_C.so")
        zf.write(gpu_lib / "a.so", "fusedopt/_cuda.so")
        zf.writestr("fusedopt/_build_info.py", f"BUILD = {record!r}\n")
        zf.writestr("fusedopt/kernels/adam.py", "")
        zf.writestr("fusedopt/backends/native.py", "")
        for member in extra:
            zf.writestr(member, b"\x7fELF")
    return str(path / name)


def test_check_a_wheel(gpu_lib, tmp_path):
    """The whole check on wheels that pass and that break one rule each."""
    name = "fusedopt-0.1.0+cu130torch2.11-cp312-cp312-linux_x86_64.whl"
    good = _fake_wheel(tmp_path, gpu_lib, name)
    problems, facts = wheel_check.check(good, cuda=True, archs="8.0;9.0+PTX")
    # the stand-in library links neither libc10 nor libcudart (a real _cuda.so does both): the
    # only problems
    assert [p for p in problems if "does not link" not in p] == []
    assert len(problems) == 2
    assert facts["archs"] == "sm_80, sm_90 + PTX compute_90"

    (tmp_path / "v").mkdir()
    vendoring = _fake_wheel(
        tmp_path / "v",
        gpu_lib,
        name,
        extra=["fusedopt.libs/libcudart-1a2b3c4d.so.13", "fusedopt/libc10.so"],
    )
    problems, _ = wheel_check.check(vendoring, cuda=True, archs="8.0;9.0+PTX")
    (vendored,) = [p for p in problems if p.startswith("vendors")]
    assert "fusedopt.libs/libcudart-1a2b3c4d.so.13" in vendored and "fusedopt/libc10.so" in vendored

    problems, _ = wheel_check.check(good, cuda=True, archs=REQUIRED)
    assert any(
        "missing ['ptx 120', 'sass 100', 'sass 120', 'sass 86', 'sass 89']" in p for p in problems
    )

    (tmp_path / "n").mkdir()
    untagged = _fake_wheel(
        tmp_path / "n", gpu_lib, "fusedopt-0.1.0+cu130torch2.13-cp312-cp312-linux_x86_64.whl"
    )
    problems, _ = wheel_check.check(untagged, cuda=True, archs="8.0;9.0+PTX")
    assert any("does not name its build (+cu130torch2.11)" in p for p in problems)


def test_contents_rule():
    """The contents rule on the names of a wheel as setup.py lays one out, CPU and CUDA."""
    names = ["fusedopt/_C.so", *wheel_check.NEEDED_FILES, "fusedopt/__init__.py"]
    assert wheel_check.check_contents(names, cuda=False) == []
    (missing,) = wheel_check.check_contents(names, cuda=True)
    assert missing == "missing fusedopt/_cuda.so"
    assert wheel_check.check_contents([*names, "kernels/adam.py"], cuda=False) == [
        "kernels/ installed top-level (must be fusedopt.kernels)"
    ]


@pytest.fixture
def built_for(monkeypatch):
    def set_(cuda_built, cuda_running):
        record = {"version": "0.1.0", "torch": torch.__version__.split("+")[0], "cuda": cuda_built}
        monkeypatch.setattr(native, "build_info", lambda: record)
        monkeypatch.setattr(torch.version, "cuda", cuda_running)

    return set_


def test_cuda_library_refused_under_another_cuda(built_for, tmp_path, monkeypatch):
    built_for("13.0", "12.8")
    reason = native._built_for_other_cuda()
    assert "built for CUDA 13.0" in reason and "uses CUDA 12.8" in reason
    assert "needs the CUDA 13 runtime" in reason
    built_for("13.0", None)
    assert "is a CPU-only build" in native._built_for_other_cuda()
    built_for("13.0", "13.2")  # CUDA's minor version compatibility: the same runtime soname
    assert native._built_for_other_cuda() is None
    built_for(None, None)  # a CPU build of fusedopt has no CUDA library to refuse
    assert native._built_for_other_cuda() is None

    # load() says it instead of trying the library (whose loader error would not say why)
    built_for("13.0", "12.8")
    (tmp_path / "_C.so").write_bytes(b"")
    (tmp_path / "_cuda.so").write_bytes(b"not a library")
    monkeypatch.setattr(native, "_HERE", str(tmp_path))
    monkeypatch.setattr(native, "_LOADED", {})
    assert "uses CUDA 12.8" in native.load("_cuda")
