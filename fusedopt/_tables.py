"""Device metadata tables for the fused kernels, built once and reused while nothing changes.

A step's kernels read three kinds of table (columns in ``_layout``): per-tensor addresses and sizes,
per-tensor grad addresses, per-group hyperparameters; plus a chunk list per (dtype) bucket.
Each part
is rebuilt only when its inputs change: the tensor table when the set of parameters taking part (or
a state tensor) changes, the grad table when a grad's storage changes, the group table when a
hyperparameter changes. Uploads go through pinned memory with ``non_blocking=True``: no host sync.
"""

import torch

from . import _layout as L


def _upload(host, device, keep):
    """``host`` on ``device``. On CUDA through pinned memory, asynchronously; the pinned copy is
    kept in ``keep`` until the table is rebuilt, so that a CUDA graph that captured the upload
    replays it from memory that is still there."""
    if device.type != "cuda":
        return host.to(device)
    pinned = host.pin_memory()
    keep.append(pinned)
    return pinned.to(device, non_blocking=True)


def _addr(t):
    return 0 if t is None else t.data_ptr()


class DeviceTables:
    """The tables of one optimizer on one device, for one backend."""

    def __init__(self, device, columns, chunk):
        self.device = device
        self.columns = columns  # optimizer hyperparameter name -> column in the group table
        self.chunk = chunk  # elements per chunk (one kernel program)
        self._tkey = self._gkey = self._hkey = None
        self.tmeta = self.grads = self.chunks = self.scal = None
        self.hyper = self.gptr = self.glr = None
        self.partials = self.clip = None
        self._pinned = {}  # table name -> pinned host copies of its last upload
        self.n_chunks = 0
        self.bucket_chunks = []  # (Bucket, chunk table view) per bucket with at least one chunk
        self.bucket_offsets = [0]
        self.n_tensors = 0

    def update(self, work):
        slots = work.slots
        tkey = tuple(
            (
                s.param.data_ptr(),
                *map(_addr, s.states),
                s.step.data_ptr(),
                _addr(s.shadow),
                s.param.numel(),
                s.group,
                s.bucket,
            )
            for s in slots
        )
        if tkey != self._tkey:
            self._build_tensor_tables(work)
            self._tkey = tkey
        gkey = tuple(s.grad.data_ptr() for s in slots)
        if gkey != self._gkey:
            host = (
                torch.tensor(gkey, dtype=torch.int64) if gkey else torch.zeros(0, dtype=torch.int64)
            )
            self._pinned["grads"] = []
            self.grads = _upload(host, self.device, self._pinned["grads"])
            self._gkey = gkey
        hkey = tuple(self._group_row(glr, hyper) for glr, hyper in zip(work.lrs, work.hyper))
        if hkey != self._hkey:
            n = len(hkey)
            self._pinned["hyper"] = []
            self.hyper = _upload(
                torch.tensor([r[0] for r in hkey], dtype=torch.float64).reshape(n, L.HYPER_WIDTH),
                self.device,
                self._pinned["hyper"],
            )
            self.gptr = _upload(
                torch.tensor([r[1] for r in hkey], dtype=torch.int64).reshape(n, L.GPTR_WIDTH),
                self.device,
                self._pinned["hyper"],
            )
            self.glr = torch.zeros(n, dtype=torch.float64, device=self.device)
            self._hkey = hkey
        return self

    def bucket_ranges(self):
        """(Bucket, chunk-table view, index of its first chunk) per bucket with chunks."""
        return [(d, c, first) for (d, c), first in zip(self.bucket_chunks, self.bucket_offsets)]

    def _group_row(self, glr, hyper):
        row = [0.0] * L.HYPER_WIDTH
        row[L.H_MODE] = float(glr.mode)
        row[L.H_LR] = glr.value
        ptrs = [0] * L.GPTR_WIDTH
        if glr.mode == L.LR_TENSOR:
            ptrs[L.G_LR_PTR] = glr.tensor.data_ptr()
        elif glr.mode == L.LR_NOAM:
            row[L.H_NOAM_SCALE] = glr.noam.scale
            row[L.H_NOAM_WARMUP] = glr.noam.warmup_coeff
            ptrs[L.G_COUNTER_PTR] = glr.counter.data_ptr()
        for name, value in hyper.items():
            row[self.columns[name]] = float(value)
        return tuple(row), tuple(ptrs)

    def _build_tensor_tables(self, work):
        slots = work.slots
        n = len(slots)
        rows = []
        for s in slots:
            row = [0] * L.TMETA_WIDTH
            row[L.T_PARAM] = s.param.data_ptr()
            for col, t in zip((L.T_S0, L.T_S1, L.T_S2), s.states):
                row[col] = _addr(t)
            row[L.T_STEP] = s.step.data_ptr()
            row[L.T_NUMEL] = s.param.numel()
            row[L.T_GROUP] = s.group
            row[L.T_SHADOW] = _addr(s.shadow)
            rows.append(row)
        meta = torch.tensor(rows, dtype=torch.int64).reshape(n, L.TMETA_WIDTH)
        self._pinned["tensors"] = []
        self.tmeta = _upload(meta, self.device, self._pinned["tensors"])
        self.scal = torch.empty(n, L.SCAL_WIDTH, dtype=torch.float32, device=self.device)
        self.n_tensors = n
        # Chunk list: (tensor index, first element) for every chunk of every tensor, bucket by
        # bucket; one kernel program per chunk. Built with tensor ops: a billion-element model
        # has hundreds of thousands of chunks.
        numel = meta[:, L.T_NUMEL]
        counts = (numel + self.chunk - 1) // self.chunk
        owner = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), counts)
        first = torch.cumsum(counts, 0) - counts
        starts = (torch.arange(owner.numel(), dtype=torch.int64) - first[owner]) * self.chunk
        chunks = torch.stack([owner, starts], dim=1).contiguous()
        self.chunks = _upload(chunks, self.device, self._pinned["tensors"])
        self.n_chunks = chunks.shape[0]
        # clipping: one sum of squares per chunk, then (coefficient, norm)
        self.partials = torch.zeros(max(1, self.n_chunks), dtype=torch.float32, device=self.device)
        self.clip = torch.zeros(L.CLIP_NORM + 1, dtype=torch.float32, device=self.device)
        self.bucket_chunks = []
        self.bucket_offsets = [0]  # chunk-list offsets of the buckets in bucket_chunks, and the end
        ends = torch.cumsum(counts, 0).tolist()
        for bucket, t0, t1 in work.buckets:
            c0 = ends[t0 - 1] if t0 > 0 else 0
            c1 = ends[t1 - 1] if t1 > 0 else 0
            if c1 > c0:
                self.bucket_chunks.append((bucket, self.chunks[c0:c1]))
                self.bucket_offsets.append(c1)
