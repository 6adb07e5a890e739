"""Check a fusedopt wheel: what it holds, what it must not vendor, which GPUs it runs on.

    python scripts/wheel_check.py WHEEL [--cuda] [--archs "8.0;8.6;...;12.0+PTX"]
                                  [--cuobjdump PATH] [--repair-dir DIR]

Run by scripts/wheel_cuda.sh on every wheel it builds (issue 23); tests/test_wheel_cuda.py runs
the same checks on wheels made to break each rule. Standard library only: it runs under any
Python, without torch. What it checks:

- the wheel holds fusedopt/_C.so (and, with --cuda, fusedopt/_cuda.so), the build record and the
  Triton kernels, and no other shared library: nothing of torch (libtorch*, libc10*) or CUDA
  (libcudart*, libcublas*, libnv*, ...) is vendored; torch's own, loaded first, are used;
- its local version names the CUDA and the torch minor version of its build record
  (``+cu130torch2.11``);
- with --cuda: every translation unit of _cuda.so holds machine code (SASS) for exactly the
  architectures of setup.py's CUDA_ARCHS (or --archs), and PTX for the newest, read from the
  library's fat binaries (fusedopt/_fatbin.py) and, with --cuobjdump, confirmed by
  ``cuobjdump --list-elf`` / ``--list-ptx``; it links the CUDA runtime dynamically
  (libcudart.so.<major>, the one torch's CUDA build loads), never statically;
- where auditwheel and patchelf are found: ``auditwheel show`` gives a manylinux tag, and
  ``auditwheel repair`` with EXCLUDES (the README's list) writes a manylinux wheel into
  --repair-dir that still holds only fusedopt's libraries.

Exit status 0 and "wheel_check: OK ..." when every check passes; 1 and one line per problem
otherwise.
"""

import argparse
import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What `auditwheel repair` must leave out: torch's libraries and the CUDA runtime come from the
# user's torch install (the README gives the same list).
EXCLUDES = (
    "libtorch.so",
    "libtorch_cpu.so",
    "libtorch_cuda.so",
    "libtorch_python.so",
    "libc10.so",
    "libc10_cuda.so",
    "libcudart.so.*",
    "libgomp.so.1",
)
OURS_CPU = ("fusedopt/_C.so",)
OURS_CUDA = ("fusedopt/_C.so", "fusedopt/_cuda.so")
NEEDED_FILES = (
    "fusedopt/_build_info.py",
    "fusedopt/kernels/adam.py",
    "fusedopt/backends/native.py",
)


def _load_fatbin():
    spec = importlib.util.spec_from_file_location(
        "fusedopt_fatbin", os.path.join(ROOT, "fusedopt", "_fatbin.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def setup_cuda_archs():
    """setup.py's CUDA_ARCHS, read without running setup.py: ("8.0", ..., "12.0")."""
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "CUDA_ARCHS" for t in node.targets
        ):
            return tuple(ast.literal_eval(node.value))
    raise LookupError("setup.py has no CUDA_ARCHS")


def parse_arch_list(text):
    """TORCH_CUDA_ARCH_LIST syntax ("8.0;9.0+PTX") -> ([80, 90], [90])."""
    sass, ptx = [], []
    for item in re.split(r"[;\s]+", text.strip()):
        if not item:
            continue
        arch = int(item.replace("+PTX", "").replace(".", ""))
        sass.append(arch)
        if item.endswith("+PTX"):
            ptx.append(arch)
    return sorted(sass), sorted(ptx)


def default_arch_list():
    archs = setup_cuda_archs()
    return ";".join(archs[:-1] + (archs[-1] + "+PTX",))


def build_record(zf):
    """The BUILD dict of the wheel's fusedopt/_build_info.py."""
    tree = ast.parse(zf.read("fusedopt/_build_info.py").decode())
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.targets[0].id == "BUILD":
            return ast.literal_eval(node.value)
    raise LookupError("no BUILD in fusedopt/_build_info.py")


def check_contents(names, cuda):
    """Problems with the list of files in a wheel."""
    problems = []
    ours = OURS_CUDA if cuda else OURS_CPU
    for needed in ours + NEEDED_FILES:
        if needed not in names:
            problems.append(f"missing {needed}")
    libs = [n for n in names if re.search(r"\.so(\.|$)", os.path.basename(n))]
    vendored = [n for n in libs if n not in ours]
    if vendored:
        problems.append(f"vendors libraries that are not fusedopt's: {', '.join(vendored)}")
    if any(n.startswith("kernels/") for n in names):
        problems.append("kernels/ installed top-level (must be fusedopt.kernels)")
    return problems


def check_version(wheel_name, record):
    """Problems with the wheel's local version against its build record."""
    torch_mm = ".".join(record["torch"].split(".")[:2])
    if record.get("cuda"):
        tag = f"+cu{record['cuda'].replace('.', '')}torch{torch_mm}"
    else:
        tag = f"+cpu.torch{torch_mm}"
    if tag not in wheel_name:
        return [f"the version of {wheel_name} does not name its build ({tag})"]
    return []


def check_archs(units, sass, ptx):
    """Problems with the fat binaries of _cuda.so: [[(kind, arch), ...] per translation unit]."""
    if not units:
        return ["_cuda.so holds no GPU code (.nv_fatbin section)"]
    problems = []
    want = {("sass", a) for a in sass} | {("ptx", a) for a in ptx}
    for i, unit in enumerate(units):
        have = set(unit)
        if have != want:
            missing = sorted(f"{k} {a}" for k, a in want - have)
            extra = sorted(f"{k} {a}" for k, a in have - want)
            problems.append(
                f"translation unit {i} of _cuda.so: missing {missing or 'nothing'}, "
                f"unexpected {extra or 'nothing'}"
            )
    return problems


def cuobjdump_archs(cuobjdump, lib):
    """(sass archs, ptx archs) as `cuobjdump --list-elf/--list-ptx` names them."""
    found = []
    for flag in ("--list-elf", "--list-ptx"):
        out = subprocess.run([cuobjdump, flag, lib], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"cuobjdump {flag} failed: {out.stderr.strip()}")
        found.append(sorted({int(m) for m in re.findall(r"\.sm_(\d+)[a-z]?\.", out.stdout)}))
    return tuple(found)


def needed_libraries(lib):
    """The DT_NEEDED entries of a library (readelf), or None without readelf."""
    readelf = shutil.which("readelf")
    if readelf is None:
        return None
    out = subprocess.run([readelf, "-d", lib], capture_output=True, text=True, timeout=60).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def check_linking(needed, cuda_version):
    problems = []
    major = cuda_version.split(".")[0]
    if f"libcudart.so.{major}" not in needed:
        problems.append(
            f"_cuda.so does not link libcudart.so.{major} dynamically (NEEDED: {needed}): a static "
            "CUDA runtime would be a second one beside torch's"
        )
    if "libc10.so" not in needed:
        problems.append(f"_cuda.so does not link torch's libc10.so (NEEDED: {needed})")
    return problems


def auditwheel_repair(wheel, repair_dir, ours):
    """(problems, manylinux tag, repaired wheel) through auditwheel show + repair."""
    auditwheel = shutil.which("auditwheel")
    if auditwheel is None or shutil.which("patchelf") is None:
        return [], None, None
    show = subprocess.run([auditwheel, "show", wheel], capture_output=True, text=True, timeout=600)
    tags = re.findall(r'"(manylinux_\d+_\d+_\w+)"', show.stdout)
    if show.returncode != 0 or not tags:
        return [f"auditwheel show gave no manylinux tag: {show.stdout}{show.stderr}"], None, None
    os.makedirs(repair_dir, exist_ok=True)
    before = set(os.listdir(repair_dir))
    cmd = [auditwheel, "repair", "--plat", tags[0], "-w", repair_dir]
    for lib in EXCLUDES:
        cmd += ["--exclude", lib]
    repair = subprocess.run(cmd + [wheel], capture_output=True, text=True, timeout=900)
    if repair.returncode != 0:
        return [f"auditwheel repair failed: {repair.stderr[-2000:]}"], tags[0], None
    (fixed,) = sorted(set(os.listdir(repair_dir)) - before) or [None]
    if fixed is None:
        return ["auditwheel repair wrote no wheel"], tags[0], None
    fixed = os.path.join(repair_dir, fixed)
    libs = sorted(n for n in zipfile.ZipFile(fixed).namelist() if ".so" in n)
    if libs != sorted(ours):
        return [f"the repaired wheel holds {libs}, not only {sorted(ours)}"], tags[0], fixed
    return [], tags[0], fixed


def check(wheel, cuda, archs=None, cuobjdump=None, repair_dir=None):
    """(problems, facts) for a wheel."""
    facts = {"wheel": os.path.basename(wheel), "size_mb": os.path.getsize(wheel) / 2**20}
    zf = zipfile.ZipFile(wheel)
    names = zf.namelist()
    problems = check_contents(names, cuda)
    record = build_record(zf) if "fusedopt/_build_info.py" in names else None
    if record is not None:
        problems += check_version(os.path.basename(wheel), record)
        facts["built"] = f"torch {record['torch']}, CUDA {record.get('cuda')}"
    if cuda and "fusedopt/_cuda.so" in names:
        sass, ptx = parse_arch_list(archs or default_arch_list())
        if record is not None and not record.get("cuda"):
            problems.append("the build record names no CUDA")
        with tempfile.TemporaryDirectory() as tmp:
            lib = zf.extract("fusedopt/_cuda.so", tmp)
            units = _load_fatbin().fatbins(lib)
            problems += check_archs(units, sass, ptx)
            facts["translation_units"] = len(units)
            facts["archs"] = _load_fatbin().describe(lib)
            facts["cuda_so_mb"] = os.path.getsize(lib) / 2**20
            if cuobjdump:
                elf, listed_ptx = cuobjdump_archs(cuobjdump, lib)
                facts["cuobjdump"] = f"elf {elf}, ptx {listed_ptx}"
                if (elf, listed_ptx) != (sass, ptx):
                    problems.append(
                        f"cuobjdump lists sm {elf} and PTX {listed_ptx}, wanted {sass} and {ptx}"
                    )
            needed = needed_libraries(lib)
            if needed is not None and record is not None and record.get("cuda"):
                problems += check_linking(needed, record["cuda"])
    if repair_dir:
        more, tag, fixed = auditwheel_repair(wheel, repair_dir, OURS_CUDA if cuda else OURS_CPU)
        problems += more
        facts["manylinux"] = tag or "not checked (auditwheel or patchelf not found)"
        if fixed:
            facts["repaired"] = fixed
    return problems, facts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    if argv is None:
        argv = sys.argv[1:]
    if argv == ["--default-archs"]:  # for scripts/wheel_cuda.sh
        print(default_arch_list())
        return 0
    ap.add_argument("wheel")
    ap.add_argument("--cuda", action="store_true", help="a CUDA wheel: check _cuda.so too")
    ap.add_argument("--archs", help="TORCH_CUDA_ARCH_LIST it must hold (default: setup.py's)")
    ap.add_argument("--cuobjdump", help="cuobjdump to confirm the architectures with")
    ap.add_argument("--repair-dir", help="where auditwheel repair writes the manylinux wheel")
    args = ap.parse_args(argv)
    problems, facts = check(args.wheel, args.cuda, args.archs, args.cuobjdump, args.repair_dir)
    for key, value in facts.items():
        print(
            f"wheel_check: {key}: {value:.1f}"
            if isinstance(value, float)
            else f"wheel_check: {key}: {value}"
        )
    for p in problems:
        print(f"wheel_check: PROBLEM: {p}")
    if problems:
        return 1
    print(f"wheel_check: OK {facts['wheel']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
