"""8-bit optimizer states: blockwise dynamic quantization, as bitsandbytes stores them (issue 24).

A state tensor of n elements is stored as n uint8 codes and one float32 ``absmax`` per block of
``BLOCK`` = 256 elements (the last block may be shorter): element i of block b is
``code_map[codes[i]] * absmax[b]``. The code maps are bitsandbytes' dynamic data type (Dettmers,
"8-Bit Approximations for Parallelism in Deep Learning"): 256 sorted values in [-1, 1] (signed,
for first moments: ``exp_avg``, ``momentum_buffer``, ``grad_avg``) or [0, 1] (unsigned, for
second moments: ``exp_avg_sq``, ``max_exp_avg_sq``, ``square_avg``), dense near zero. Each
value is a power of ten from 1e-6 to 1 times the midpoints of an evenly divided [0.1, 1]: the
larger the exponent, the more fraction values it gets (1, 2, 4, ..., 64 signed; 2, 4, ..., 128
unsigned), plus 0 and 1 (the signed map's lowest value is -0.993, not -1).

Quantizing a block divides it by its absolute maximum and takes, per element, the nearest value of
the map by float32 distance (a tie takes the lower one). The maps are bitsandbytes 0.50's, bit for
bit, and so is the dequantization; its CPU quantization finds the nearest value for only about
half the elements (its search is approximate: tests/test_quant8.py measures it), and where its
code differs from ours, ours is the nearer one.

This module is the reference the kernels are checked against: plain torch ops, any device.
"""

import torch

BLOCK = 256

# Which map each state of each optimizer uses (issue 24): signed for first moments, unsigned for
# second moments (never negative).
SIGNED_STATES = frozenset({"exp_avg", "momentum_buffer", "grad_avg"})
UNSIGNED_STATES = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg"})

_MAPS = {}


def dynamic_map(signed, device="cpu"):
    """The 256-value dynamic quantization map, float32, sorted ascending."""
    key = (bool(signed), torch.device(device))
    if key not in _MAPS:
        values = [0.0, 1.0]
        for exponent in range(7):  # the scale 10**(exponent - 6): 1e-6 ... 1
            n = 2**exponent if signed else 2 ** (exponent + 1)
            edges = torch.linspace(0.1, 1, n + 1, dtype=torch.float32)
            mids = (edges[:-1] + edges[1:]) / 2.0
            scaled = (10.0 ** (exponent - 6)) * mids  # float32, as the map is stored
            values += scaled.tolist()
            if signed:
                values += (-scaled).tolist()
        assert len(values) == 256
        _MAPS[key] = torch.tensor(sorted(values), dtype=torch.float32, device=key[1])
    return _MAPS[key]


def map_for(state_name, device="cpu"):
    """The map of an optimizer state by its torch.optim name."""
    if state_name in SIGNED_STATES:
        return dynamic_map(True, device)
    if state_name in UNSIGNED_STATES:
        return dynamic_map(False, device)
    raise KeyError(f"fusedopt: no 8-bit map for the state {state_name!r}")


def n_blocks(numel, block=BLOCK):
    return (numel + block - 1) // block


def _blocks(x, block):
    """x flattened to float32 and zero-padded to whole blocks: (n_blocks, block)."""
    flat = x.reshape(-1).to(torch.float32)
    pad = n_blocks(flat.numel(), block) * block - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block)


def nearest_code(normed, code):
    """The index of the value of ``code`` (sorted) nearest to each element of ``normed``, by
    float32 distance; a tie takes the lower one (as bitsandbytes' CPU kernel does)."""
    low = (torch.bucketize(normed, code, right=True) - 1).clamp(0, code.numel() - 2)
    left, right = code[low], code[low + 1]
    nearest = low + ((normed - right).abs() < (normed - left).abs()).to(low.dtype)
    # NaN (a block with a NaN has a NaN absmax, so every value of it reads back NaN): code 0,
    # as the kernels' search gives it
    return torch.where(normed != normed, 0, nearest)


def quantize_blockwise(x, code, block=BLOCK):
    """(codes, absmax): x's uint8 codes (x's shape) and float32 absmax per block.

    Each element is divided by its block's absolute maximum and takes the nearest value of
    ``code``. An all-zero block (absmax 0) takes the code of 0 everywhere."""
    blocks = _blocks(x, block)
    absmax = blocks.abs().amax(dim=1)
    normed = blocks / torch.where(absmax > 0, absmax, 1.0).unsqueeze(1)
    codes = nearest_code(normed.reshape(-1)[: x.numel()], code).to(torch.uint8)
    return codes.view(x.shape), absmax


def dequantize_blockwise(codes, absmax, code, block=BLOCK):
    """float32 values (codes' shape) of uint8 ``codes`` with per-block ``absmax``."""
    values = code[codes.reshape(-1).long()]
    pad = n_blocks(values.numel(), block) * block - values.numel()
    if pad:
        values = torch.cat([values, values.new_zeros(pad)])
    out = (values.view(-1, block) * absmax.unsqueeze(1)).reshape(-1)[: codes.numel()]
    return out.view(codes.shape)


def state_bytes(numel, block=BLOCK):
    """Bytes an 8-bit state of ``numel`` elements takes: the codes and the absmaxes."""
    return numel + 4 * n_blocks(numel, block)


# ---------------------------------------------------------------------------------------------
# An optimizer's 8-bit state (``state_dtype=torch.uint8``): a state ``name`` of a parameter is
# stored as ``state[name]``, uint8 codes with the parameter's shape and strides, and
# ``state[name + ABSMAX]``, float32 [n_blocks(numel)]. The blocks run over the parameter's
# elements in memory order (a channels_last parameter's too), as the fused kernels walk them.
#
# A DTensor parameter (FSDP2, HSDP, tensor parallel) keeps its state as DTensors, as torch.optim
# does, so that torch.distributed.checkpoint saves and loads every rank's part. The codes have
# the parameter's mesh and placements. The blocks run over each rank's local shard: a rank's state
# is exactly the 8-bit state a plain parameter equal to its shard would have, and a block never
# spans two ranks (no communication). The absmaxes are a DTensor of global shape
# [shards, per_rank] (absmax_shape), sharded along dim 0 over each mesh dim the parameter is
# sharded over (replicated over the others): each rank holds one row, per_rank = the blocks of the
# largest local shard (torch.chunk's first), its own blocks first and zeros after. A checkpoint
# of another sharding has another [shards, per_rank], which load_state_dict and
# torch.distributed.checkpoint refuse; to_torch_state_dict's float32 states reshard like torch's.

ABSMAX = "_absmax"


def absmax_name(state_name):
    return state_name + ABSMAX


def _dtensor():
    from torch.distributed.tensor import DTensor  # noqa: PLC0415 - only for DTensor parameters

    return DTensor


def is_dtensor(t):
    return isinstance(t, _dtensor())


def _sharding(like):
    """(shards, per_rank, placements) of the absmaxes of a DTensor parameter ``like``."""
    from torch.distributed.tensor import Replicate, Shard  # noqa: PLC0415

    shape, shards, placements = list(like.shape), 1, []
    for mesh_dim, placement in enumerate(like.placements):
        if placement.is_shard():
            n = like.device_mesh.size(mesh_dim)
            dim = placement.dim if placement.dim >= 0 else placement.dim + len(shape)
            shape[dim] = -(-shape[dim] // n)  # torch.chunk: the first pieces are the largest
            shards *= n
            placements.append(Shard(0))
        elif placement.is_replicate():
            placements.append(Replicate())
        else:
            raise ValueError(
                f"fusedopt: an 8-bit state needs a parameter sharded or replicated on each mesh "
                f"dimension; this one is {like.placements}"
            )
    largest = 1
    for size in shape:
        largest *= size
    return shards, n_blocks(largest), placements


def absmax_shape(like):
    """The shape of the absmaxes of an 8-bit state of parameter ``like``: (n_blocks(numel),),
    or (shards, per_rank) for a DTensor (see above)."""
    if is_dtensor(like):
        shards, per_rank, _ = _sharding(like)
        return (shards, per_rank)
    return (n_blocks(like.numel()),)


def sharding_of(name, value, like):
    """Why ``value``, the 8-bit state ``name`` (codes, or absmaxes if ``name`` ends in ABSMAX) of
    parameter ``like``, is not laid out as ``like``'s sharding needs; None when it is."""
    if not is_dtensor(like):
        return "a DTensor, and its parameter is not" if is_dtensor(value) else None
    want = _sharding(like)[2] if name.endswith(ABSMAX) else like.placements
    if not is_dtensor(value):
        return f"a plain tensor; a DTensor parameter's 8-bit state is a DTensor ({tuple(want)})"
    if tuple(value.placements) != tuple(want) or value.device_mesh != like.device_mesh:
        return (
            f"sharded as {value.placements} on {value.device_mesh}, not {tuple(want)} on "
            f"{like.device_mesh}"
        )
    return None


def local_absmax(absmax, numel):
    """The absmaxes of the local blocks of an 8-bit state of ``numel`` local elements: a 1-d
    view (of a DTensor's local row) that the kernels read and write."""
    if is_dtensor(absmax):
        return absmax.to_local().reshape(-1)[: n_blocks(numel)]
    return absmax


def _wrap_absmax(local_blocks, like):
    """A DTensor parameter's absmaxes from this rank's blocks (padded with zeros)."""
    shards, per_rank, placements = _sharding(like)
    row = local_blocks.new_zeros((1, per_rank))
    row[0, : local_blocks.numel()] = local_blocks
    return _dtensor().from_local(
        row,
        like.device_mesh,
        placements,
        run_check=False,
        shape=(shards, per_rank),
        stride=(per_rank, 1),
    )


def _wrap_like(local, like):
    """``local`` (this rank's part) as a DTensor with ``like``'s mesh, placements and shape."""
    return _dtensor().from_local(
        local,
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


def storage_flat(t):
    """A 1-d view of a dense tensor's elements in memory order."""
    return torch.as_strided(t, (t.numel(),), (1,), t.storage_offset())


def zero_code(state_name):
    """The code of 0.0 in the map of ``state_name``."""
    code = map_for(state_name)
    return int((code == 0).nonzero()[0, 0])


def empty_state(like, state_name):
    """A zero 8-bit state for a parameter ``like``: (codes, absmax)."""
    if is_dtensor(like):
        codes, absmax = empty_state(like.to_local(), state_name)
        return _wrap_like(codes, like), _wrap_absmax(absmax, like)
    codes = torch.full_like(
        like, zero_code(state_name), dtype=torch.uint8, memory_format=torch.preserve_format
    )
    absmax = torch.zeros(n_blocks(like.numel()), dtype=torch.float32, device=like.device)
    return codes, absmax


def quantize_state(value, like, state_name):
    """(codes, absmax) of the float tensor ``value`` (``like``'s shape) as ``like``'s 8-bit
    state ``state_name``: the codes in ``like``'s layout, the blocks in its memory order."""
    if is_dtensor(like):
        if not is_dtensor(value) or value.placements != like.placements:
            raise ValueError(
                f"fusedopt: the state {state_name!r} of a DTensor parameter ({like.placements}) "
                "must be a DTensor with its placements to be quantized; got "
                + (f"{value.placements}" if is_dtensor(value) else "a plain tensor")
            )
        codes, absmax = quantize_state(value.to_local(), like.to_local(), state_name)
        return _wrap_like(codes, like), _wrap_absmax(absmax, like)
    codes, _ = empty_state(like, state_name)
    laid = torch.empty_like(like, dtype=torch.float32, memory_format=torch.preserve_format)
    laid.copy_(value)
    flat_codes, absmax = quantize_blockwise(storage_flat(laid), map_for(state_name, like.device))
    storage_flat(codes).copy_(flat_codes)
    return codes, absmax


def dequantize_state(codes, absmax, state_name):
    """The float32 values (``codes``' shape and layout) of an 8-bit state."""
    if is_dtensor(codes):
        local = codes.to_local()
        values = dequantize_state(local, local_absmax(absmax, local.numel()), state_name)
        return _wrap_like(values, codes)
    out = torch.empty_like(codes, dtype=torch.float32, memory_format=torch.preserve_format)
    values = dequantize_blockwise(storage_flat(codes), absmax, map_for(state_name, codes.device))
    storage_flat(out).copy_(values)
    return out


def to_torch_state_dict(state_dict):
    """A copy of an optimizer state_dict with every 8-bit state replaced by its float32 values, as
    torch.optim loads it (``torch.optim.AdamW.load_state_dict(to_torch_state_dict(sd))``); other
    entries are shared, not copied."""
    out = {k: v for k, v in state_dict.items() if k != "state"}
    out["state"] = {}
    for key, st in state_dict["state"].items():
        new = dict(st)
        for name, value in st.items():
            scale = st.get(absmax_name(name))
            if scale is not None and isinstance(value, torch.Tensor):
                new[name] = dequantize_state(value.to(torch.uint8), scale.float(), name)
                del new[absmax_name(name)]
        out["state"][key] = new
    return out
