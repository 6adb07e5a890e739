"""fusedopt inside torch's distributed engines: DDP and FSDP2 (gloo, 2 CPU processes), and
torch.distributed.checkpoint (sharded save and load of the optimizer state)."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import need_backend

import fusedopt

WORLD = 2
FP32 = dict(rtol=2e-6, atol=1e-7)


def _init(rank, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))


def _batch(rank, step):
    gen = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(4, 16, generator=gen), torch.randn(4, 8, generator=gen)


def _train(model, opt, rank, steps, start=0):
    for k in range(start, start + steps):
        x, y = _batch(rank, k)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def _ddp_worker(rank, init_file, backend):
    _init(rank, init_file)
    try:
        results = []
        for make in (
            lambda ps: torch.optim.AdamW(ps, lr=1e-2),
            lambda ps: fusedopt.AdamW(ps, lr=1e-2, backend=backend),
        ):
            model = _model()
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            _train(ddp, make(ddp.parameters()), rank, 4)
            results.append([p.detach().clone() for p in model.parameters()])
        for a, b in zip(*results):
            torch.testing.assert_close(b, a, **FP32)
        # and the ranks agree with each other
        flat = torch.cat([p.reshape(-1) for p in results[1]])
        gathered = [torch.empty_like(flat) for _ in range(WORLD)]
        dist.all_gather(gathered, flat)
        assert torch.equal(gathered[0], gathered[1])
    finally:
        dist.destroy_process_group()


def _fsdp_worker(rank, init_file, backend, ckpt_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    _init(rank, init_file)
    try:

        def sharded(make):
            model = _model()
            for layer in model:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer)
            fully_shard(model)
            return model, make(model.parameters())

        def full(model):
            return [p.full_tensor().clone() for p in model.parameters()]

        ours = lambda ps: fusedopt.AdamW(ps, lr=1e-2, amsgrad=True, backend=backend)  # noqa: E731
        ref_model, ref_opt = sharded(lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True))
        model, opt = sharded(ours)
        _train(ref_model, ref_opt, rank, 3)
        _train(model, opt, rank, 3)
        for a, b in zip(full(ref_model), full(model)):
            torch.testing.assert_close(b, a, **FP32)
        for p in model.parameters():  # the state keeps the parameters' sharding, as torch's does
            assert isinstance(p, DTensor)
            assert isinstance(opt.state[p]["exp_avg"], DTensor)
            assert opt.state[p]["exp_avg"].placements == p.placements

        # sharded checkpoint: save, load into fresh objects, continue == uninterrupted
        dcp.save(
            {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
            checkpoint_id=ckpt_dir,
        )
        _train(model, opt, rank, 2, start=3)
        fresh_model, fresh_opt = sharded(ours)
        _train(fresh_model, fresh_opt, rank, 1, start=100)  # some unrelated state to overwrite
        state = {
            "model": get_model_state_dict(fresh_model),
            "optim": get_optimizer_state_dict(fresh_model, fresh_opt),
        }
        dcp.load(state, checkpoint_id=ckpt_dir)
        set_model_state_dict(fresh_model, state["model"])
        set_optimizer_state_dict(fresh_model, fresh_opt, state["optim"])
        _train(fresh_model, fresh_opt, rank, 2, start=3)
        for a, b in zip(full(model), full(fresh_model)):
            torch.testing.assert_close(b, a, **FP32)
    finally:
        dist.destroy_process_group()


def _run_and_exit(rank, fn, *args):
    """Run a worker; on success leave with os._exit(0). torch 2.13's gloo teardown at interpreter
    exit sometimes aborts ("terminate called without an active exception", seen with
    torch.optim alone too), after all the work and checks are done: skip that teardown."""
    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(fn, *args):
    mp.spawn(_run_and_exit, args=(fn, *args), nprocs=WORLD, join=True)


def _need(backend):
    reason = fusedopt.backends.unavailable(backend, "cpu")
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_ddp_matches_torch(backend, tmp_path):
    _need(backend)
    _spawn(_ddp_worker, str(tmp_path / "init"), backend)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_fsdp2_matches_torch_and_checkpoints(backend, tmp_path):
    _need(backend)
    os.makedirs(tmp_path / "ckpt")
    _spawn(_fsdp_worker, str(tmp_path / "init"), backend, str(tmp_path / "ckpt"))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_fsdp2_single_gpu(backend, tmp_path):
    """FSDP2 on one GPU (world size 1, nccl): the DTensor path with CUDA kernels."""
    need_backend(backend, "cuda")
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        results = []
        for make in (
            lambda ps: torch.optim.AdamW(ps, lr=1e-2),
            lambda ps: fusedopt.AdamW(ps, lr=1e-2, backend=backend),
        ):
            model = _model().cuda()
            fully_shard(model)
            opt = make(model.parameters())
            for k in range(3):
                x, y = (t.cuda() for t in _batch(0, k))
                torch.nn.functional.mse_loss(model(x), y).backward()
                opt.step()
                opt.zero_grad()
            results.append([p.full_tensor().clone() for p in model.parameters()])
        for a, b in zip(*results):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
def test_parameters_on_two_devices():
    """One optimizer over CPU and CUDA parameters: one pass per device, each on its backend."""
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7).cuda())]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, ropt = fusedopt.AdamW(params, lr=1e-2), torch.optim.AdamW(ref, lr=1e-2)
    for k in range(3):
        for a, b in zip(params, ref):
            g = torch.randn(a.shape, generator=torch.Generator().manual_seed(k)).to(a.device)
            a.grad, b.grad = g, g.clone()
        opt.step()
        ropt.step()
    for a, b in zip(params, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
