"""torch.compile of a training step that calls opt.step(), and CUDA graph capture of one."""

import pytest
import torch
from conftest import backend_device_params

import fusedopt
from fusedopt import backends


def _model_and_data(device, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    model = model.to(device)
    data = [
        (torch.randn(16, 8, device=device), torch.randn(16, 4, device=device)) for _ in range(8)
    ]
    return model, data


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_compiled_training_step(backend, device, require_backend):
    """A torch.compile'd step (forward, backward, opt.step(), zero_grad) gives the eager losses and
    parameters, and an lr changed by a scheduler every step causes no recompilation."""
    require_backend(backend, device)
    torch._dynamo.reset()
    runs = []
    for compiled in (False, True):
        model, data = _model_and_data(device)
        opt = fusedopt.AdamW(model.parameters(), lr=1e-2, backend=backend, max_grad_norm=1.0)
        sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.8)

        def train_step(x, y, model=model, opt=opt):
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

        step = torch.compile(train_step) if compiled else train_step
        losses = []
        for i, (x, y) in enumerate(data):
            if compiled and i == 2:  # compiled by now; a recompilation would raise from here on
                torch.compiler.set_stance("fail_on_recompile")
            losses.append(step(x, y).item())
            sched.step()
        torch.compiler.set_stance("default")
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    (eager_losses, eager_params), (losses, params) = runs
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    for a, b in zip(eager_params, params):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_cuda_graph_whole_step(backend):
    """A whole training step (forward, backward, opt.step() with a Noam lr, GradScaler-free)
    captured in a CUDA graph and replayed gives the eager run's parameters."""
    if backends.unavailable(backend, "cuda"):
        pytest.skip(backends.unavailable(backend, "cuda"))
    results = []
    for graphed in (False, True):
        model, data = _model_and_data("cuda")
        opt = fusedopt.AdamW(
            model.parameters(), lr=fusedopt.Noam(16, 3), backend=backend, capturable=True
        )
        loss_fn = torch.nn.functional.mse_loss
        static_x, static_y = data[0][0].clone(), data[0][1].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: state, tables, kernels compiled
            for x, y in data[:3]:
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
                opt.step()
        torch.cuda.current_stream().wait_stream(side)
        if graphed:
            graph = torch.cuda.CUDAGraph()
            opt.zero_grad(set_to_none=True)
            with torch.cuda.graph(graph):
                loss_fn(model(static_x), static_y).backward()
                opt.step()
            for x, y in data[3:]:
                static_x.copy_(x)
                static_y.copy_(y)
                graph.replay()
        else:
            for x, y in data[3:]:
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
                opt.step()
        torch.cuda.synchronize()
        assert float(opt.param_groups[0]["noam_step"]) == len(data)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
