"""torch.compile of a training step that calls opt.step(), and CUDA graph capture of one."""

import pytest
import torch
from conftest import backend_device_params, need_backend

import fusedopt
from fusedopt.schedule import Schedule


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


def _graph_run(backend, lr, graphed, monkeypatch, cls="AdamW"):
    """Warm-up, then a schedule of steps, each a graph replay (or, ungraphed, the same eager step)
    or an eager step with another float lr in between; the parameters at the end."""
    model, data = _model_and_data("cuda")
    kw = dict(momentum=0.9, nesterov=True) if cls == "SGD" else dict(capturable=True)
    opt = getattr(fusedopt, cls)(
        model.parameters(), lr=lr, backend=backend, max_grad_norm=1.0, **kw
    )
    loss_fn = torch.nn.functional.mse_loss

    def eager_step(x, y):
        opt.zero_grad(set_to_none=True)  # new grads, in new memory
        loss_fn(model(x), y).backward()
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: state, tables, kernels compiled
        for x, y in data[:3]:
            eager_step(x, y)
    torch.cuda.current_stream().wait_stream(side)
    static_x, static_y = data[0][0].clone(), data[0][1].clone()
    if graphed:
        original = torch.Tensor.pin_memory

        def pin_memory(self, *args, **kwargs):
            assert not torch.cuda.is_current_stream_capturing(), "pin_memory() during a capture"
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)  # the captured backward allocates grads in the graph's pool
        with torch.cuda.graph(graph):
            loss_fn(model(static_x), static_y).backward()
            opt.step()
    for i, (x, y) in enumerate(data[3:]):
        if i == 2:  # an eager step between replays, with another float lr: new tables, in place
            if not isinstance(lr, Schedule):
                opt.param_groups[0]["lr"] = lr / 2
            eager_step(x, y)
            opt.param_groups[0]["lr"] = lr
        elif graphed:
            static_x.copy_(x)
            static_y.copy_(y)
            graph.replay()
        else:
            eager_step(x, y)
    torch.cuda.synchronize()
    if isinstance(lr, Schedule):
        assert float(opt.param_groups[0][lr.COUNTER_KEY]) == len(data)
    return [p.detach().clone() for p in model.parameters()], opt.last_grad_norm


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_reported_norm_and_lr_stay_in_place(backend, device, require_backend):
    """What a captured step writes at every replay and what the optimizer reports must be the same
    memory: the last grad norm and a scheduled group's last lr are written in place, step after
    step, by every backend (the torch backend made new tensors, so after an eager step between
    replays last_grad_norm showed that eager step's norm: 1-24% off on an H200, 2026-12-04)."""
    require_backend(backend, device)
    model, data = _model_and_data(device)
    opt = fusedopt.AdamW(
        model.parameters(),
        lr=fusedopt.schedules.cosine(1e-2, 1, 6),
        backend=backend,
        max_grad_norm=1.0,
    )
    seen = []
    for x, y in data[:3]:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        seen.append((opt._last_grad_norm.data_ptr(), opt._last_lr[0].data_ptr()))
        expected = torch.cat([p.grad.double().flatten() for p in model.parameters()]).norm()
        # a float32 norm of float64 sums of squares: within a few float32 ulps (1.2e-7 each)
        assert float(opt.last_grad_norm) == pytest.approx(float(expected), rel=1e-6)
    assert seen[1:] == seen[:-1]


@pytest.mark.cuda
@pytest.mark.parametrize(
    "lr",
    [1e-2, fusedopt.Noam(16, 3), fusedopt.schedules.wsd(1e-2, 2, 3, total=8)],
    ids=["float-lr", "noam", "wsd"],
)
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("cls", ["AdamW", "SGD"])
def test_cuda_graph_whole_step(backend, lr, cls, monkeypatch):
    """A whole training step (forward, backward, opt.step() with clipping) captured in a CUDA
    graph, with grads allocated in the graph's pool during the capture (so the grad table is
    uploaded inside it, from memory pinned before), replayed with an eager step in between that
    changes the lr: the same parameters and last norm as running every step eagerly. Both ways the
    replays after the eager step see the graph's own tables."""
    need_backend(backend, "cuda")
    (eager, eager_norm), (graphed, norm) = (
        _graph_run(backend, lr, g, monkeypatch, cls) for g in (False, True)
    )
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(norm, eager_norm, rtol=1e-6, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_first_step_cannot_be_captured(backend):
    """The first step of a parameter creates its state: inside a capture that is refused, with a
    clear error, before anything changes."""
    need_backend(backend, "cuda")
    model, data = _model_and_data("cuda")
    opt = fusedopt.AdamW(model.parameters(), lr=1e-2, backend=backend, capturable=True)
    torch.nn.functional.mse_loss(model(data[0][0]), data[0][1]).backward()
    before = [p.detach().clone() for p in model.parameters()]
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="eager step"):
        with torch.cuda.graph(graph):
            opt.step()
    assert not opt.state
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)
