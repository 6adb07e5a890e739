"""The wheel: what it holds (and does not vendor), its version tag, its build metadata, and the
refusal to load libraries built for another torch."""

import importlib.util
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
_spec = importlib.util.spec_from_file_location("wheel_check", ROOT / "scripts" / "wheel_check.py")
wheel_check = importlib.util.module_from_spec(_spec)  # the README's excludes, and the checks
_spec.loader.exec_module(wheel_check)


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
    readelf = shutil.which("readelf")
    if readelf:
        lib = tmp_path / "_C.so"
        lib.write_bytes(zipfile.ZipFile(wheel).read("fusedopt/_C.so"))
        needed = subprocess.run([readelf, "-d", str(lib)], capture_output=True, text=True).stdout
        assert "libc10.so" in needed  # linked against torch's own, found at run time
    # scripts/wheel_check.py: the files, nothing vendored, the version against the build record
    # and, where auditwheel and patchelf are installed (scripts/setup_env.sh installs them),
    # auditwheel show + repair with the README's excludes keeping only fusedopt's libraries
    problems, facts = wheel_check.check(
        str(wheel), cuda="fusedopt/_cuda.so" in names, repair_dir=str(tmp_path / "repaired")
    )
    assert problems == []
    if shutil.which("auditwheel") and shutil.which("patchelf"):
        assert facts["manylinux"].startswith("manylinux_")
