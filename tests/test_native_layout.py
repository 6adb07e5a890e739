"""csrc/include/fusedopt/layout.h and fusedopt/_layout.py describe the same tables."""

import re
from pathlib import Path

from fusedopt import _layout as L

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "include" / "fusedopt" / "layout.h"


def _header_constants():
    found, ns = {}, None
    for line in HEADER.read_text().splitlines():
        opened = re.match(r"namespace (\w+) \{", line)
        if opened:
            ns = None if opened.group(1) == "fusedopt" else opened.group(1)
            continue
        if line.startswith("}"):
            ns = None
        for name, value in re.findall(r"(\w+) = (\d+)", line):
            found[f"{ns}.{name}" if ns else name] = int(value)
    return found


def test_header_matches_python_layout():
    c = _header_constants()
    expected = {
        "LR_FLOAT": L.LR_FLOAT,
        "LR_TENSOR": L.LR_TENSOR,
        "LR_NOAM": L.LR_NOAM,
        "T_PARAM": L.T_PARAM,
        "T_S0": L.T_S0,
        "T_S1": L.T_S1,
        "T_S2": L.T_S2,
        "T_STEP": L.T_STEP,
        "T_NUMEL": L.T_NUMEL,
        "T_GROUP": L.T_GROUP,
        "TMETA_WIDTH": L.TMETA_WIDTH,
        "T_A0": L.T_A0,
        "T_A1": L.T_A1,
        "T_A2": L.T_A2,
        "QBLOCK": L.QBLOCK,
        "T_ERR": L.T_ERR,
        "BUCKET_ERROR_SHIFT": L.BUCKET_ERROR_SHIFT,
        "G_LR_PTR": L.G_LR_PTR,
        "G_COUNTER_PTR": L.G_COUNTER_PTR,
        "GPTR_WIDTH": L.GPTR_WIDTH,
        "H_LR": L.H_LR,
        "H_MODE": L.H_MODE,
        "H_NOAM_SCALE": L.H_NOAM_SCALE,
        "H_NOAM_WARMUP": L.H_NOAM_WARMUP,
        "HYPER_WIDTH": L.HYPER_WIDTH,
        "SCAL_WIDTH": L.SCAL_WIDTH,
        "CLIP_COEF": L.CLIP_COEF,
        "T_SHADOW": L.T_SHADOW,
        "BUCKET_GRAD_SHIFT": L.BUCKET_GRAD_SHIFT,
        "BUCKET_STATE_SHIFT": L.BUCKET_STATE_SHIFT,
        "BUCKET_SHADOW_BIT": L.BUCKET_SHADOW_BIT,
        "BUCKET_STOCHASTIC_BIT": L.BUCKET_STOCHASTIC_BIT,
        "CLIP_NORM": L.CLIP_NORM,
        "CLIP_PER_BLOCK": L.CLIP_PER_BLOCK,
        "DTYPE_FLOAT32": L.DTYPE_CODES["float32"],
        "DTYPE_BFLOAT16": L.DTYPE_CODES["bfloat16"],
        "DTYPE_FLOAT16": L.DTYPE_CODES["float16"],
        "DTYPE_UINT8": L.DTYPE_CODES["uint8"],
    }
    sched = "LR_SCHEDULE G_SCHED_PTR SP_KIND SP_WARMUP SP_A SP_B SP_C SP_D SP_E SP_F SP_N".split()
    sched += "SP_MILESTONES SK_CONSTANT SK_LINEAR SK_COSINE SK_COSINE_RESTARTS".split()
    sched += "SK_POLYNOMIAL SK_INVERSE_SQRT SK_WSD SK_EXPONENTIAL SK_MULTISTEP".split()
    sched += "SHAPE_LINEAR SHAPE_COSINE SHAPE_1_SQRT".split()
    expected.update({k: getattr(L, k) for k in sched})
    expected.update({f"OPT_{k.upper()}": v for k, v in L.OPTIMIZERS.items()})
    for name in L.OPTIMIZERS:
        cols, scal = getattr(L, f"{name.upper()}_COLS"), getattr(L, f"{name.upper()}_SCAL")
        expected.update({f"{name}_col.{k}": v for k, v in cols.items()})
        expected.update({f"{name}_scal.{k}": i for i, k in enumerate(scal)})
    assert {k: c.get(k) for k in expected} == expected


def test_quant8_header_maps_are_python_maps():
    """csrc/include/fusedopt/quant8.h's maps are fusedopt.quant8's bit for bit, and each
    optimizer's kSignedSlots names the slots whose state quant8 quantizes with the signed map."""
    import torch  # noqa: PLC0415

    import fusedopt  # noqa: PLC0415
    from fusedopt import quant8  # noqa: PLC0415

    text = (HEADER.parent / "quant8.h").read_text()
    for name, signed in (("kSignedMap", True), ("kUnsignedMap", False)):
        body = text.split(f"{name}[256] = {{", 1)[1].split("};", 1)[0]
        values = [float.fromhex(v.strip().removesuffix("f")) for v in body.split(",") if v.strip()]
        expected = quant8.dynamic_map(signed)
        assert torch.equal(torch.tensor(values, dtype=torch.float32), expected), name
    optim = HEADER.parent / "optim"
    for cls, header in ((fusedopt.Adam, "adam.h"), (fusedopt.RMSprop, "rmsprop.h"),
                        (fusedopt.SGD, "sgd.h")):  # fmt: skip
        mask = int(re.search(r"kSignedSlots = 0b([01]+)u", (optim / header).read_text())[1], 2)
        signed = sum(1 << k for k, n in enumerate(cls._state_names) if n in quant8.SIGNED_STATES)
        assert mask == signed, header
