"""The wheel: what it holds (and does not vendor), its version tag, its build metadata, and the
refusal to load libraries built for another torch."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import fusedopt
from fusedopt import backends
from fusedopt.backends import native

ROOT = Path(__file__).resolve().parents[1]


def test_build_info_names_this_torch():
    info = native.build_info()
    if info is None:
        pytest.skip("fusedopt was not built from setup.py here (no fusedopt/_build_info.py)")
    assert info["torch"] == torch.__version__.split("+")[0]
    assert (info["cuda"] is None) == (info["cuda_archs"] is None)


def test_library_built_for_another_torch_is_refused(monkeypatch):
    monkeypatch.setattr(native, "build_info", lambda: {"torch": "1.13.1", "cuda": "11.7"})
    monkeypatch.setattr(native, "_LOADED", {})
    reason = backends.unavailable("cpu", "cpu")
    assert "built for torch 1.13.1" in reason and torch.__version__ in reason
    assert backends.select("auto", "cpu") == "torch"  # falls back instead of crashing
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    fusedopt.AdamW([p]).step()


@pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs the source tree")
def test_cpu_wheel(tmp_path):
    """pip wheel . --no-build-isolation: the compiled CPU library and the Triton kernels inside,
    a local version naming torch, and no libtorch / libc10 / CUDA runtime vendored."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-build-isolation",
            "--no-deps",
            "-w",
            str(tmp_path),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("fusedopt-*.whl")
    torch_mm = ".".join(torch.__version__.split(".")[:2])
    tag = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu."
    assert f"+{tag}torch{torch_mm}" in wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    for needed in (
        "fusedopt/_C.so",
        "fusedopt/_build_info.py",
        "fusedopt/kernels/adam.py",
        "fusedopt/backends/native.py",
    ):
        assert needed in names, needed
    assert not any(n.startswith("kernels/") for n in names), "kernels/ must be fusedopt.kernels"
    vendored = [n for n in names if any(lib in n for lib in ("libtorch", "libc10", "libcudart"))]
    assert not vendored
    readelf = shutil.which("readelf")
    if readelf:
        lib = tmp_path / "_C.so"
        lib.write_bytes(zipfile.ZipFile(wheel).read("fusedopt/_C.so"))
        needed = subprocess.run([readelf, "-d", str(lib)], capture_output=True, text=True).stdout
        assert "libc10.so" in needed  # linked against torch's own, found at run time
    if shutil.which("auditwheel") and shutil.which("patchelf"):
        show = subprocess.run(["auditwheel", "show", str(wheel)], capture_output=True, text=True)
        assert show.returncode == 0, show.stderr
        plat = next(w.strip('".') for w in show.stdout.split() if w.startswith('"manylinux'))
        excludes = [
            "libtorch.so",
            "libtorch_cpu.so",
            "libtorch_cuda.so",
            "libtorch_python.so",
            "libc10.so",
            "libc10_cuda.so",
            "libcudart.so.*",
            "libgomp.so.1",
        ]
        repair = subprocess.run(
            [
                "auditwheel",
                "repair",
                "--plat",
                plat,
                "-w",
                str(tmp_path / "repaired"),
                *(a for lib in excludes for a in ("--exclude", lib)),
                str(wheel),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert repair.returncode == 0, repair.stderr[-3000:]
        (fixed,) = (tmp_path / "repaired").glob("*.whl")
        libs = [n for n in zipfile.ZipFile(fixed).namelist() if ".so" in n]
        assert libs == ["fusedopt/_C.so"], libs
