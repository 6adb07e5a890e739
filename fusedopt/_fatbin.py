"""What GPU code a compiled library holds, read from its ELF file without CUDA's tools.

nvcc puts each translation unit's device code in the library's ``.nv_fatbin`` section as one fat
binary: a header (magic 0xBA55ED50, a 16-bit version, a 16-bit header size, a 64-bit size of the
entries), then one entry per architecture, each a header (16-bit kind: 1 PTX, 2 ELF/SASS; 32-bit
header size; 64-bit payload size; the architecture, 80 for sm_80, as a 32-bit word at byte 28)
and its payload. Checked against ``cuobjdump --list-elf`` / ``--list-ptx`` on the wheels that
scripts/wheel_cuda.sh builds (scripts/wheel_check.py does so on every build), so that
``python -m fusedopt.info`` can say which GPUs a library runs on where no CUDA toolkit is
installed, as on most machines that install a wheel.
"""

import struct

FATBIN_MAGIC = 0xBA55ED50
KIND = {1: "ptx", 2: "sass"}


def _section(data, wanted):
    """(offset, size) of the ELF64 little-endian section named ``wanted``, or None."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]
    for name_off, _type, _flags, _addr, offset, size in headers:
        start = names_at + name_off
        if data[start : data.index(b"\0", start)].decode() == wanted:
            return offset, size
    return None


def fatbins(path):
    """One list per fat binary (per translation unit) in the library at ``path``, of
    (kind, arch) pairs: ("sass", 90) for sm_90 machine code, ("ptx", 120) for compute_120 PTX."""
    with open(path, "rb") as f:
        data = f.read()
    found = _section(data, ".nv_fatbin")
    if found is None:
        return []
    offset, size = found
    out, pos, end = [], offset, offset + size
    while pos + 16 <= end:
        magic, _version, header_size, entries_size = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:  # the fat binaries are 8-byte aligned, padding between
            pos += 8
            continue
        entries, p, stop = [], pos + header_size, pos + header_size + entries_size
        while p < stop:
            kind, _v, entry_header, payload = struct.unpack_from("<HHIQ", data, p)
            (arch,) = struct.unpack_from("<I", data, p + 28)
            entries.append((KIND.get(kind, f"kind{kind}"), arch))
            p += entry_header + payload
        out.append(entries)
        pos = stop
    return out


def summary(path):
    """The architectures every fat binary of the library holds, e.g. {"sass": [80, 86, 89, 90,
    100, 120], "ptx": [120]}; an architecture missing from some translation unit is left out (the
    kernels of that unit would not run there)."""
    units = fatbins(path)
    if not units:
        return {"sass": [], "ptx": []}
    common = set.intersection(*(set(u) for u in units))
    return {k: sorted(a for kind, a in common if kind == k) for k in ("sass", "ptx")}


def describe(path):
    """ "sm_80, sm_86, sm_89, sm_90, sm_100, sm_120 + PTX compute_120" for the library at path."""
    s = summary(path)
    text = ", ".join(f"sm_{a}" for a in s["sass"]) or "no GPU machine code"
    if s["ptx"]:
        text += " + PTX " + ", ".join(f"compute_{a}" for a in s["ptx"])
    return text
