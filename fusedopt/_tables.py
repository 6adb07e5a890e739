"""Device metadata tables for the fused kernels, built once and reused while nothing changes.

A step's kernels read three kinds of table (columns in ``_layout``): per-tensor addresses and sizes,
per-tensor grad addresses, per-group hyperparameters; plus a chunk list per (dtype) bucket. Each
part is uploaded again only when its inputs change: the tensor table when the set of parameters
taking part (or a state tensor) changes, the grad table when a grad's storage changes, the group
table when a hyperparameter changes. Uploads go through pinned memory with ``non_blocking=True``:
no host sync.

CUDA graphs. A captured step reads these tables and writes the scratch ones (lrs, per-tensor
scalars, clipping) at the addresses it saw at capture, and replays and eager steps may come in any
order afterwards. So:
- every table lives in a device buffer that is refilled in place while its shape is unchanged (a
  new lr or weight decay, new state tensors after ``load_state_dict``, grads in new memory), and a
  buffer that a capture has used is never freed: when a new shape needs a new buffer, the old one
  is kept;
- a capture uploads every table, whether it changed or not, so that each replay first rewrites the
  tables with what the graph was captured with; and once a graph exists, each eager step uploads
  every table again too, since a replay may have rewritten them since;
- an upload during a capture copies from a pinned host buffer allocated before it (``pin_memory()``
  cannot run inside a capture) and kept, unchanged, as long as the tables live: every replay copies
  from it again.
"""

import torch

from . import _layout as L


def _addr(t):
    return 0 if t is None else t.data_ptr()


_UPLOADED = ("tmeta", "chunks", "grads", "hyper", "gptr")  # the tables written from the host


def _capturing(device):
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class DeviceTables:
    """The tables of one optimizer on one device, for one backend."""

    def __init__(self, device, columns, chunk):
        self.device = device
        self.columns = columns  # optimizer hyperparameter name -> column in the group table
        self.chunk = chunk  # elements per chunk (one kernel program)
        self._tkey = self._layout = self._gkey = self._hkey = None
        self.has_schedule = False
        self._buffers = {}  # name -> the device buffer its table is a view of
        self._spares = {}  # name -> a pinned host buffer reserved for an upload during capture
        self._kept = []  # buffers a captured graph may still read or copy from
        self._host = {}  # name -> the host tensor last uploaded into it (for re-uploads)
        self.captured = False  # a CUDA graph has captured a step over these tables
        self.tmeta = self.grads = self.chunks = self.scal = None
        self.hyper = self.gptr = self.glr = None
        self.partials = self.clip = self.clip_stage = None
        self.n_chunks = 0
        self.bucket_chunks = []  # (Bucket, chunk table view) per bucket with at least one chunk
        self.bucket_codes = []  # their codes (_layout.bucket_code), as the native ops take them
        self.bucket_offsets = [0]
        self.n_tensors = 0

    # ------------------------------------------------------------------ buffers
    def _buffer(self, name, shape, dtype, zero=False):
        """A view of shape ``shape`` of the device buffer ``name``: the same memory as before when
        the shape is unchanged. A new buffer replaces it otherwise; the old one is kept alive if a
        captured graph may use it."""
        old = self._buffers.get(name)
        if old is not None and tuple(old.shape) == tuple(shape):
            return old
        if old is not None and self.captured:
            self._kept.append(old)
        new = (torch.zeros if zero else torch.empty)(shape, dtype=dtype, device=self.device)
        self._buffers[name] = new
        return new

    def _upload(self, name, host):
        """Write the host tensor ``host`` into buffer ``name`` (same shape), without a sync."""
        dev = self._buffer(name, host.shape, host.dtype)
        if self.device.type != "cuda":
            dev.copy_(host)
            return dev
        if _capturing(self.device):
            staging = self._spares.pop(name)[: host.numel()].view(host.shape)
            staging.copy_(host)  # host memory: an ordinary CPU copy
            self._kept.append(staging)  # every replay copies from it again
        else:
            # a fresh pinned copy: torch's host allocator reuses its memory only once the copy
            # has run, so it can be dropped right away
            staging = host.pin_memory()
        dev.copy_(staging, non_blocking=True)
        return dev

    def _check_capture(self, uploads):
        """Raise before anything changes when an upload inside a capture has no pinned buffer."""
        missing = [
            name
            for name, host in uploads
            if name not in self._spares or self._spares[name].numel() < host.numel()
        ]
        if missing:
            raise RuntimeError(
                "fusedopt: this step, captured in a CUDA graph, needs metadata tables "
                f"({', '.join(missing)}) larger than any step before the capture, and pinned "
                "memory cannot be allocated during a capture. Run one eager step with the same "
                "parameters "
                "and options before capturing (as torch.cuda.graphs' warm-up does)."
            )
        self.captured = True

    def _reserve_spares(self):
        """Outside a capture: give each uploaded table a pinned buffer of its size, for an upload
        during a capture to use."""
        if self.device.type != "cuda":
            return
        for name in _UPLOADED:
            dev = self._buffers.get(name)
            spare = self._spares.get(name)
            if dev is not None and (spare is None or spare.numel() < dev.numel()):
                self._spares[name] = torch.empty(
                    max(dev.numel(), 1), dtype=dev.dtype, pin_memory=True
                )

    # ------------------------------------------------------------------ update
    def update(self, work):
        """Bring the tables up to date with ``work``. All or nothing: an error leaves them as
        they were."""
        slots = work.slots
        tkey = tuple(
            (
                s.param.data_ptr(),
                *map(_addr, s.states),
                *map(_addr, s.absmax or ()),
                _addr(s.error),
                s.step.data_ptr(),
                _addr(s.shadow),
                s.param.numel(),
                s.group,
                s.bucket,
            )
            for s in slots
        )
        gkey = tuple(s.grad.data_ptr() for s in slots)
        hkey = tuple(self._group_row(glr, hyper) for glr, hyper in zip(work.lrs, work.hyper))
        layout = (  # what the chunk list depends on; it can change only with the tensor table
            self._layout
            if tkey == self._tkey
            else (tuple(s.param.numel() for s in slots), tuple(work.buckets))
        )
        capturing = _capturing(self.device)
        every = capturing or self.captured  # see the module's docstring
        uploads = []  # (name, host tensor)
        if every or tkey != self._tkey:
            uploads.append(("tmeta", self._tensor_rows(slots)))
        if every or layout != self._layout:
            uploads.append(("chunks", self._chunk_list(layout[0])))
        if every or gkey != self._gkey:
            uploads.append(("grads", torch.tensor(gkey, dtype=torch.int64).reshape(len(gkey))))
        if every or hkey != self._hkey:
            n = len(hkey)
            rows, ptrs = [r[0] for r in hkey], [r[1] for r in hkey]
            uploads.append(("hyper", torch.tensor(rows, dtype=torch.float64).reshape(n, -1)))
            uploads.append(("gptr", torch.tensor(ptrs, dtype=torch.int64).reshape(n, -1)))
        if not uploads:
            self._reserve_spares()
            return self
        if capturing:
            self._check_capture(uploads)
        for name, host in uploads:
            setattr(self, name, self._upload(name, host))
            self._host[name] = host
        if tkey != self._tkey:
            self.n_tensors = len(slots)
            self.scal = self._buffer("scal", (len(slots), L.SCAL_WIDTH), torch.float32)
            # the clip buffer (coefficient, norm) is made once and keeps the last norm
            self.clip = self._buffer("clip", (L.CLIP_NORM + 1,), torch.float32, zero=True)
        if layout != self._layout:
            self._bucket_ranges(work.buckets, layout[0])
        if hkey != self._hkey:
            self.glr = self._buffer("glr", (len(hkey),), torch.float64, zero=True)
        self._tkey, self._layout, self._gkey = tkey, layout, gkey
        self._set_hkey(hkey)
        if not capturing:
            self._reserve_spares()
        return self

    def refresh(self, work, grad_addrs):
        """Under a cached plan (fusedopt/_plan.py), whose tensors are those of the last
        ``update``: upload the grads' addresses ``grad_addrs`` (an int64 host tensor, or None when
        unchanged) and, when ``work.hyper_changed``, the group rows that changed. All or nothing,
        as ``update``."""
        capturing = _capturing(self.device)
        every = capturing or self.captured  # see the module's docstring
        uploads = []
        if every:
            uploads += [("tmeta", self._host["tmeta"]), ("chunks", self._host["chunks"])]
        if every or grad_addrs is not None:
            uploads.append(("grads", self._host["grads"] if grad_addrs is None else grad_addrs))
        hkey = self._hkey
        if work.hyper_changed:
            hkey = tuple(self._group_row(g, h) for g, h in zip(work.lrs, work.hyper))
        if every or hkey != self._hkey:
            n = len(hkey)
            rows, ptrs = [r[0] for r in hkey], [r[1] for r in hkey]
            uploads.append(("hyper", torch.tensor(rows, dtype=torch.float64).reshape(n, -1)))
            uploads.append(("gptr", torch.tensor(ptrs, dtype=torch.int64).reshape(n, -1)))
        if capturing:
            self._check_capture(uploads)
        for name, host in uploads:
            if name == "grads" and host is grad_addrs:
                # the plan rewrites its buffer at every step: what is kept must be a copy. Not
                # clone(): an 80 kB malloc right after the model freed last step's grads makes
                # glibc consolidate every freed chunk (about 2 ms at 10,000 fresh grads). A host
                # table is that copy already; pinned memory comes from torch's caching allocator,
                # except inside a capture, where pin_memory() cannot run: there a plain copy, which
                # _upload stages through the buffer pinned before the capture.
                if self.device.type != "cuda":
                    host = self._buffer(name, host.shape, host.dtype).copy_(host)
                elif capturing:
                    host = host.clone()
                else:
                    host = host.pin_memory()
            setattr(self, name, self._upload(name, host))
            self._host[name] = host
        if grad_addrs is not None:
            self._gkey = None  # an update() after this compares against nothing: it uploads
        self._set_hkey(hkey)
        if not capturing:
            self._reserve_spares()
        return self

    def bucket_ranges(self):
        """(Bucket, chunk-table view, index of its first chunk) per bucket with chunks."""
        return [(d, c, first) for (d, c), first in zip(self.bucket_chunks, self.bucket_offsets)]

    def _set_hkey(self, hkey):
        """The group rows the tables hold now; ``has_schedule``: whether any group's lr is an
        LR_SCHEDULE (the Triton prologue evaluates schedules only then)."""
        if hkey is not self._hkey:
            self.has_schedule = any(row[L.H_MODE] == L.LR_SCHEDULE for row, _ in hkey)
        self._hkey = hkey

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
        elif glr.mode == L.LR_SCHEDULE:  # H_LR: the schedule's base lr
            ptrs[L.G_COUNTER_PTR] = glr.counter.data_ptr()
            ptrs[L.G_SCHED_PTR] = glr.params.data_ptr()
        for name, value in hyper.items():
            row[self.columns[name]] = float(value)
        return tuple(row), tuple(ptrs)

    @staticmethod
    def _tensor_rows(slots):
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
            for col, t in zip((L.T_A0, L.T_A1, L.T_A2), s.absmax or ()):
                row[col] = _addr(t)
            row[L.T_ERR] = _addr(s.error)
            rows.append(row)
        return torch.tensor(rows, dtype=torch.int64).reshape(len(slots), L.TMETA_WIDTH)

    def _counts(self, numels):
        return (torch.tensor(numels, dtype=torch.int64) + self.chunk - 1) // self.chunk

    def _chunk_list(self, numels):
        """(tensor index, first element) for every chunk of every tensor, bucket by bucket; one
        kernel program per chunk. Built with tensor ops: a billion-element model has hundreds of
        thousands of chunks."""
        counts = self._counts(numels)
        owner = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
        first = torch.cumsum(counts, 0) - counts
        starts = (torch.arange(owner.numel(), dtype=torch.int64) - first[owner]) * self.chunk
        return torch.stack([owner, starts], dim=1).contiguous().reshape(-1, 2)

    def _bucket_ranges(self, buckets, numels):
        self.n_chunks = self.chunks.shape[0]
        # clipping: one sum of squares per chunk, then the float64 sums of the reduction's first
        # stage (layout.h's partials_numel)
        n = L.partials_numel(self.n_chunks)
        self.partials = self._buffer("partials", (n,), torch.float32)
        start = L.clip_stage_offset(self.n_chunks)
        self.clip_stage = self.partials[start:n].view(torch.float64)
        self.bucket_chunks = []
        self.bucket_offsets = [0]  # chunk-list offsets of the buckets in bucket_chunks, and the end
        ends = torch.cumsum(self._counts(numels), 0).tolist()
        for bucket, t0, t1 in buckets:
            c0 = ends[t0 - 1] if t0 > 0 else 0
            c1 = ends[t1 - 1] if t1 > 0 else 0
            if c1 > c0:
                self.bucket_chunks.append((bucket, self.chunks[c0:c1]))
                self.bucket_offsets.append(c1)
        self.bucket_codes = [L.bucket_code(b) for b, _ in self.bucket_chunks]


def tables_for(opt, backend, work, columns, chunk):
    """``opt``'s tables for ``backend`` on ``work.device``, created on first use and brought up to
    date with ``work``. New tables start from the optimizer's last grad norm, so that a step
    GradScaler skips right after (which writes no norm) still reports it."""
    key = (backend, work.device)
    tables = opt._tables.get(key)
    if work.fast is not None:  # a cached plan: the tables are those its walk left
        plan, index = work.fast
        return tables.refresh(work, plan.grad_addrs(index) if plan.grads_changed(index) else None)
    if tables is not None:
        return tables.update(work)
    tables = DeviceTables(work.device, columns, chunk).update(work)
    if opt._last_grad_norm is not None:
        tables.clip[L.CLIP_NORM].copy_(opt._last_grad_norm)
    opt._tables[key] = tables
    return tables
