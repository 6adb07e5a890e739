"""The benchmark harness: byte model, roofline arithmetic, presets, and the CLI end to end."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusedopt
from fusedopt import bench


@pytest.mark.parametrize(
    "optimizer,dtype,flags,expected",
    [
        ("adamw", torch.float32, {}, 28),
        ("adam", torch.float32, {"amsgrad": True}, 36),
        ("adamw-noam", torch.float32, {}, 28),
        ("adamw-cosine", torch.float32, {}, 28),
        ("train-step", torch.float32, {}, 32),
        ("train-step-cosine", torch.float32, {}, 32),
        ("adamw", torch.bfloat16, {}, 14),
        ("rmsprop", torch.float32, {}, 20),
        ("rmsprop", torch.float32, {"momentum": True}, 28),
        ("rmsprop", torch.float32, {"momentum": True, "centered": True}, 36),
        ("rmsprop", torch.float16, {}, 10),
        ("sgd", torch.float32, {}, 12),
        ("sgd-momentum", torch.float32, {}, 20),
        ("sgd", torch.bfloat16, {}, 6),
        # 8-bit moments: a byte per element, and a float32 absmax per 256 read and written
        ("adamw", torch.float32, {"state_dtype": torch.uint8}, 16 + 2 * 2 * 4 / 256),
        ("sgd-momentum", torch.float32, {"state_dtype": torch.uint8}, 14 + 2 * 4 / 256),
        # compressed masters: the bf16 parameter and its error term read and written
        ("adamw", torch.bfloat16, {"state_dtype": torch.float32, "error_bits": 16}, 26),
        ("adamw", torch.bfloat16, {"state_dtype": torch.uint8, "error_bits": 8}, 12 + 4 / 64),
    ],
)
def test_bytes_per_param(optimizer, dtype, flags, expected):
    """The table of ../shared/FACTS.md: each input read once, each output written once."""
    assert bench.bytes_per_param(optimizer, dtype, **flags) == expected


@pytest.mark.parametrize(
    "optimizer,expected",
    [
        ("adamw", {"bitsandbytes AdamW8bit", "torchao AdamW8bit"}),
        ("adam", {"bitsandbytes Adam8bit", "torchao Adam8bit"}),
        ("rmsprop", {"bitsandbytes RMSprop8bit"}),
        ("sgd-momentum", {"bitsandbytes SGD8bit"}),
    ],
)
def test_eight_bit_providers(optimizer, expected):
    """--precision 8bit-state times bitsandbytes' and torchao's 8-bit optimizers (both installed
    by scripts/setup_env.sh) beside fusedopt's: each steps, with 8-bit state for a tensor of
    4096 elements or more and the parameters changed. (The wheel checks' fresh venvs have neither
    package: they skip it; the source run has both.)"""
    pytest.importorskip("bitsandbytes")
    if any(name.startswith("torchao") for name in expected):
        pytest.importorskip("torchao")
    factories = bench._factories(
        optimizer, torch.device("cpu"), torch.float32, [], False, "8bit-state"
    )
    assert expected <= set(factories)
    assert not any(
        "8bit" in n
        for n in bench._factories(optimizer, torch.device("cpu"), torch.float32, [], False)
    )
    for name in expected:
        params = bench._make_params([(64, 64), (10,)], torch.float32, torch.device("cpu"), seed=0)
        before = [p.detach().clone() for p in params]
        step = factories[name](params)
        step()
        step()
        assert all(not torch.equal(p, b) for p, b in zip(params, before)), name
        opt = step.__self__
        eight_bit = [t for t in opt.state[params[0]].values() if isinstance(t, torch.Tensor)]
        if name.startswith("bitsandbytes"):
            assert any(t.dtype == torch.uint8 and t.shape == (64, 64) for t in eight_bit), name
        else:  # torchao keeps a tensor subclass whose codes are uint8
            assert any(type(t).__name__ == "OptimState8bit" for t in eight_bit), name


def test_state_bytes_measured_from_the_state():
    """The bench's "state B/param": torch.optim's AdamW keeps two fp32 moments (8 B) and a step
    counter per tensor; fusedopt's 8-bit AdamW a code per element and a float32 absmax per 256
    for each moment (2.03 B, within the issue's 2.1 for tensors of 4096 or more); torchao's
    8-bit state counted by its inner uint8 codes, scales and maps, not the float32 it shows, and
    its fp32 state where a tensor's size is no multiple of its block (20,000 is not one of 256, nor
    the uniform-16m preset's 2,000,000)."""
    shapes = [(256, 256)]
    n = 256 * 256
    params = bench._make_params(shapes, torch.float32, torch.device("cpu"), seed=0)
    step = bench._factories("adamw", torch.device("cpu"), torch.float32, [], False)["torch fused"](
        params
    )
    step()
    assert bench.optimizer_of(step) is step.__self__
    assert bench.state_bytes(bench.optimizer_of(step)) == 8 * n + 4  # exp_avg, exp_avg_sq, step
    params = bench._make_params(shapes, torch.float32, torch.device("cpu"), seed=0)
    opt = fusedopt.AdamW(params, lr=1e-3, backend="torch", state_dtype=torch.uint8)
    opt.step()
    per_param = bench.state_bytes(opt) / n
    assert 2 * (1 + 4 / 256) <= per_param <= 2 * (1 + 4 / 256) + 8 / n  # and the step counter
    # a step function that names its optimizer (the scheduled torch providers)
    params = bench._make_params(shapes, torch.float32, torch.device("cpu"), seed=0)
    step = bench._factories("adamw-noam", torch.device("cpu"), torch.float32, [], False)[
        "torch fused"
    ](params)
    step()
    assert bench.state_bytes(bench.optimizer_of(step)) == 8 * n + 4
    ao = pytest.importorskip("torchao.optim")
    for numel, moments in ((n, 2 * (n + 4 * n // 256)), (20_000, 2 * 4 * 20_000)):
        p = torch.nn.Parameter(torch.randn(numel))
        p.grad = torch.randn(numel)
        opt = ao.AdamW8bit([p], lr=1e-3, block_size=256)
        opt.step()
        # besides the moments: the step counter, and where 8-bit its two maps of 256 floats
        maps = 2 * 256 * 4 if numel == n else 0
        assert bench.state_bytes(opt) == moments + maps + 4, numel


def test_roofline_arithmetic():
    # 1e9 fp32 AdamW params at 3.0 TB/s cannot step faster than 9.33 ms (FACTS.md's H100 figure)
    assert bench.roofline_seconds(1e9, 28, 3.0e12) == pytest.approx(28 / 3000)
    assert bench.achieved(1e9, 28, 28 / 3000) == pytest.approx(3.0e12)
    assert bench.achieved(2e6, 20, 1e-3) == pytest.approx(40e9)


def test_presets_have_the_models_sizes():
    count = {name: sum(math.prod(s) for s in make()) for name, (_, make) in bench.PRESETS.items()}
    assert count["gpt2-small"] == 124_439_808  # GPT-2 small's published parameter count
    assert 60e6 < count["transformer-base"] < 66e6  # the paper reports 65M for the base model
    assert 1.2e9 < count["llama-1b"] < 1.3e9  # Llama 3.2 1B: 1.24B
    assert count["many-small"] == 10_000 * 4096 and len(bench.PRESETS["many-small"][1]()) == 10_000
    assert len(bench.PRESETS["huge"][1]()) == 1


def test_cli_end_to_end(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fusedopt.bench",
            "--device",
            "cpu",
            "--preset",
            "tiny",
            "--optimizer",
            "adamw",
            "--optimizer",
            "rmsprop",
            "--optimizer",
            "train-step",
            "--optimizer",
            "adamw-cosine",
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--out",
            str(tmp_path),
            "--plot",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| tiny | adamw | float32 | torch fused |" in out.stdout
    files = {p.suffix for p in tmp_path.iterdir()}
    assert files == {".csv", ".json", ".md", ".png"}
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    env = data["environment"]
    for key in ("torch", "device", "git_commit", "date", "fusedopt"):
        assert key in env
    providers = {(r["optimizer"], r["provider"]) for r in data["rows"]}
    assert ("adamw", "torch fused") in providers and ("rmsprop", "torch fused") not in providers
    assert ("adamw", "fusedopt torch") in providers
    assert ("train-step", "torch fused") in providers and (
        "train-step",
        "fusedopt cpu",
    ) in providers
    # the in-kernel cosine against torch's AdamW stepping transformers' scheduler
    assert {("adamw-cosine", "torch fused"), ("adamw-cosine", "fusedopt cpu")} <= providers
    for r in data["rows"]:
        assert r["ms"] > 0 and r["gb_s"] == pytest.approx(
            r["params"] * r["bytes_per_param"] / (r["ms"] / 1e3) / 1e9
        )
        best = min(
            x["ms"]
            for x in data["rows"]
            if x["optimizer"] == r["optimizer"] and x["provider"].startswith("torch")
        )
        assert r["speedup_vs_torch_best"] == pytest.approx(best / r["ms"])
        if r["optimizer"] == "adamw":  # two fp32 moments and 4 step counters on 3,081 params
            assert r["state_bytes_per_param"] == pytest.approx(8 + 16 / 3081), r["provider"]
    assert "| B/param moved | state B/param |" in out.stdout
    csv_lines = next(tmp_path.glob("*.csv")).read_text().splitlines()
    assert len(csv_lines) == 1 + len(data["rows"]) and "git_commit" in csv_lines[0]


def test_demo_runs():
    """benchmarks/demo.py, the README's training demo: both runs train and print their curves."""
    demo = Path(__file__).resolve().parents[1] / "benchmarks" / "demo.py"
    out = subprocess.run(
        [sys.executable, str(demo), "--steps", "4", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fusedopt AdamW" in out.stdout and "torch AdamW" in out.stdout
