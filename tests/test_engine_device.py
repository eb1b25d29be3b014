"""``engine.device`` for the in-process, pool and Ray engines: which device each process
trains on, the one-line refusals, and that the CPU path trains exactly as before.

The CUDA runs at the bottom compare each engine on a GPU with the CPU run (float
tolerance); they skip where torch sees no CUDA device.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from fedloom.cli import main
from fedloom.client.device import NO_CUDA, resolve_device, worker_device
from fedloom.client.learner import OnDevice
from fedloom.client_store import ClientStateStore
from fedloom.config import ConfigError, load_config
from fedloom.data import build_federated_dataset
from fedloom.engine.inprocess import InProcessExecutor
from fedloom.engine.pool import ProcessPoolExecutor
from fedloom.engine.ray import actor_cuda_index, actor_gpu_share
from fedloom.engine.simulation import run_simulation
from fedloom.messages import GLOBAL, FitResult, FitTask
from fedloom.strategies import simulation_runtime

from .helpers import client_runtime, final_weights, toy_dataset

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(
    not CUDA, reason="torch sees no CUDA device here; the GPU runs need one"
)

SMALL = [
    "data.name=synthetic",
    "data.num_clients=6",
    "rounds=2",
    "client.epochs=1",
    "server.fraction_fit=1.0",
    "server.min_fit_clients=6",
    "eval.max_examples=200",
]


# --------------------------------------------------------------------- resolution
def test_worker_i_trains_on_gpu_i_mod_the_gpu_count() -> None:
    cuda = torch.device("cuda")
    assert [str(worker_device(i, cuda, gpus=3)) for i in range(7)] == [
        "cuda:0",
        "cuda:1",
        "cuda:2",
        "cuda:0",
        "cuda:1",
        "cuda:2",
        "cuda:0",
    ]
    assert {worker_device(i, cuda, gpus=1) for i in range(4)} == {torch.device("cuda", 0)}
    cpu = torch.device("cpu")
    assert [worker_device(i, cpu, gpus=2) for i in range(3)] == [cpu, cpu, cpu]
    with pytest.raises(ConfigError, match="no CUDA device"):
        worker_device(0, cuda, gpus=0)


def test_auto_and_cuda_follow_what_is_available() -> None:
    assert resolve_device("auto", cuda_available=False) == torch.device("cpu")
    assert resolve_device("auto", cuda_available=True) == torch.device("cuda")
    assert resolve_device("cuda", cuda_available=True) == torch.device("cuda")
    assert resolve_device("cpu", cuda_available=True) == torch.device("cpu")
    with pytest.raises(ConfigError) as err:
        resolve_device("cuda", cuda_available=False)
    assert str(err.value) == NO_CUDA and "\n" not in NO_CUDA
    assert "set engine.device = 'auto' or 'cpu'" in NO_CUDA


@pytest.mark.skipif(CUDA, reason="checks the CPU-only answer; this machine has a GPU")
def test_auto_is_the_cpu_on_a_machine_without_a_gpu() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_device("cuda")


@pytest.mark.skipif(CUDA, reason="checks the refusal without a GPU; this machine has one")
def test_cuda_without_a_gpu_is_one_line_and_a_nonzero_exit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for engine in ("inprocess", "pool"):
        args = ["run", "--set", "rounds=1", "--set", f"engine.name={engine}"]
        code = main([*args, "--set", "engine.device=cuda", "--out", str(tmp_path / engine)])
        err = capsys.readouterr().err.strip()
        assert code != 0
        assert len(err.splitlines()) == 1 and "engine.device = 'cuda'" in err, err
        assert "set engine.device = 'auto' or 'cpu'" in err


@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason="checks the refusal without a GPU; this machine has one")
def test_ray_cuda_on_a_cluster_without_gpus_is_one_line(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'fedloom[ray]')")
    cfg = load_config(
        None, [*SMALL, "engine.name=ray", "engine.workers=1", "engine.device=cuda", "rounds=1"]
    )
    with pytest.raises(ConfigError, match="the Ray cluster has no GPUs") as err:
        run_simulation(cfg, tmp_path / "ray")
    assert "\n" not in str(err.value)
    assert not ray.is_initialized()  # the instance it started is shut down again


def test_device_config_rules() -> None:
    for engine in ("inprocess", "pool", "ray", "vectorized"):
        for device in ("cpu", "cuda", "auto"):
            cfg = load_config(None, [f"engine.name={engine}", f"engine.device={device}"])
            assert cfg.engine.device == device
    assert load_config(None).engine.device == "cpu"
    ok = load_config(None, ["engine.name=ray", "engine.device=cuda", "engine.actor_gpus=0.25"])
    assert ok.engine.actor_gpus == 0.25
    with pytest.raises(ConfigError, match=r"engine\.actor_gpus reserves GPUs for Ray actors"):
        load_config(None, ["engine.name=pool", "engine.device=cuda", "engine.actor_gpus=0.5"])
    with pytest.raises(ConfigError, match=r"engine\.actor_gpus reserves GPUs for Ray actors"):
        load_config(None, ["engine.name=ray", "engine.actor_gpus=0.5"])  # device cpu
    with pytest.raises(ConfigError, match="actor_gpus"):
        load_config(None, ["engine.name=ray", "engine.device=cuda", "engine.actor_gpus=1.5"])
    with pytest.raises(ConfigError, match="device"):
        load_config(None, ["engine.device=tpu"])


def test_ray_actors_share_gpus_by_packing() -> None:
    # Default: ceil(actors / gpus) actors on each GPU.
    assert actor_gpu_share(16, 1, None) == 0.0625
    assert actor_gpu_share(3, 2, None) == 0.5  # two on one GPU, one on the other
    assert actor_gpu_share(2, 4, None) == 1.0
    assert actor_gpu_share(3, 1, None) == pytest.approx(0.3333)
    assert actor_gpu_share(4, 2, 0.5) == 0.5
    # A fraction is placed on one GPU: 0.4 fits two per GPU, so 5 actors need 3 GPUs.
    with pytest.raises(ConfigError, match=r"do not fit on the Ray cluster's 2 GPUs \(2 per GPU\)"):
        actor_gpu_share(5, 2, 0.4)
    with pytest.raises(ConfigError, match="the Ray cluster has no GPUs"):
        actor_gpu_share(2, 0, None)


def test_ray_actor_finds_its_gpu_in_cuda_visible_devices() -> None:
    assert actor_cuda_index([3], "3") == 0
    assert actor_cuda_index(["3"], "1,3") == 1
    assert actor_cuda_index([2], None) == 2  # Ray left the variable alone
    with pytest.raises(RuntimeError, match="no GPU"):
        actor_cuda_index([], "0")


# --------------------------------------------------------------------- the CPU path
def test_a_correction_tensor_on_its_own_device_is_itself() -> None:
    anchor = torch.arange(4, dtype=torch.float32)
    held = OnDevice(anchor)
    assert held.like(torch.zeros(4)) is anchor
    moved = held.like(torch.zeros(4, device="meta"))
    assert moved.device.type == "meta" and held.like(torch.zeros(1, device="meta")) is moved


def test_runtime_on_another_device_is_a_copy_and_dp_sgd_refuses_it() -> None:
    """The 'meta' device stands in for a GPU: the copy's structure, not its numbers."""
    cfg = load_config(None)
    runtime = client_runtime(cfg, toy_dataset())
    assert runtime.on_device(torch.device("cpu")) is runtime
    moved = runtime.on_device(torch.device("meta"))
    assert moved is not runtime and moved.learner.device.type == "meta"
    assert runtime.learner.device.type == "cpu"  # the server's learner stays
    np.testing.assert_array_equal(moved.initial_vector(), runtime.initial_vector())
    dp_cfg = load_config(None, ["privacy.local_dp=true", "privacy.local_noise_multiplier=1.1"])
    dp = client_runtime(dp_cfg, toy_dataset())
    with pytest.raises(ConfigError, match=r"dp-sgd' trains on the CPU.*engine\.device = 'cpu'"):
        dp.on_device(torch.device("meta"))


def test_inprocess_on_cpu_trains_exactly_as_the_runtime(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.num_clients=4", "client.epochs=1", "strategy=fedprox"])
    data = toy_dataset(clients=4)
    runtime = client_runtime(cfg, data)
    executor = InProcessExecutor(runtime, ClientStateStore(), device="cpu")
    assert executor.runtime is runtime  # no copy on the CPU: the very same learner
    w = runtime.initial_vector()
    tasks = [FitTask(client_id=c, round=1, model_version=0) for c in range(4)]
    via_engine = executor.fit(tasks, {GLOBAL: w})
    direct = client_runtime(cfg, data)
    for task, out in zip(tasks, via_engine, strict=True):
        assert isinstance(out, FitResult) and out.delta is not None
        ref = direct.fit(task, {GLOBAL: w}, ClientStateStore().get(task.client_id))
        assert ref.delta is not None
        np.testing.assert_array_equal(out.delta, ref.delta)
        assert out.delta.dtype == np.float32


def test_pool_on_auto_trains_as_in_process() -> None:
    cfg = load_config(None, [*SMALL, "engine.name=pool"])
    sizes = build_federated_dataset(cfg.data, cfg.seed).client_sizes().tolist()
    factory = partial(simulation_runtime, cfg.model_dump_json())
    pool = ProcessPoolExecutor(factory, sizes, ClientStateStore(), workers=1, device="auto")
    try:
        expected = torch.device("cuda", 0) if CUDA else torch.device("cpu")
        assert pool.devices[0] == expected
        w = factory().initial_vector()
        tasks = [FitTask(client_id=c, round=1, model_version=0) for c in range(6)]
        outs = pool.fit(tasks, {GLOBAL: w})
        reference = InProcessExecutor(factory(), ClientStateStore()).fit(tasks, {GLOBAL: w})
        for out, ref in zip(outs, reference, strict=True):
            assert isinstance(out, FitResult) and isinstance(ref, FitResult)
            assert out.delta is not None and ref.delta is not None
            if CUDA:
                np.testing.assert_allclose(out.delta, ref.delta, atol=1e-5)
            else:
                np.testing.assert_array_equal(out.delta, ref.delta)
    finally:
        pool.close()


def test_device_cpu_run_equals_the_default_run(tmp_path: Path) -> None:
    run_simulation(load_config(None, SMALL), tmp_path / "default")
    run_simulation(load_config(None, [*SMALL, "engine.device=cpu"]), tmp_path / "cpu")
    np.testing.assert_array_equal(
        final_weights(tmp_path / "cpu"), final_weights(tmp_path / "default")
    )


# --------------------------------------------------------------------- on a GPU
def _weights(tmp_path: Path, name: str, overrides: list[str]) -> np.ndarray:
    run_simulation(load_config(None, overrides), tmp_path / name)
    return final_weights(tmp_path / name)


@needs_cuda
@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["strategy=fedprox", "eval.federated=true"],  # the proximal anchor, client evaluation
        ["strategy=scaffold"],  # the control shift
        ["strategy=ditto", "eval.federated=true"],  # the personal pull
        ["strategy=fedrep"],  # the frozen-coordinate mask
    ],
)
def test_inprocess_on_cuda_equals_cpu(tmp_path: Path, extra: list[str]) -> None:
    base = [*SMALL, *extra]
    cpu = _weights(tmp_path, "cpu", base)
    gpu = _weights(tmp_path, "gpu", [*base, "engine.device=cuda"])
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)


@needs_cuda
def test_pool_on_cuda_equals_cpu(tmp_path: Path) -> None:
    cpu = _weights(tmp_path, "cpu", SMALL)
    gpu = _weights(
        tmp_path, "pool", [*SMALL, "engine.name=pool", "engine.workers=2", "engine.device=cuda"]
    )
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)


@needs_cuda
def test_ray_on_cuda_equals_cpu(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'fedloom[ray]')")
    cpu = _weights(tmp_path, "cpu", SMALL)
    overrides = [*SMALL, "engine.name=ray", "engine.workers=2", "engine.device=cuda"]
    gpu = _weights(tmp_path, "ray", overrides)
    assert not ray.is_initialized()
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)


def test_runtime_copy_keeps_its_dataclass_fields() -> None:
    """on_device changes the learner and nothing else a runtime is configured with."""
    runtime = client_runtime(load_config(None), toy_dataset())
    moved = runtime.on_device(torch.device("meta"))
    for f in dataclasses.fields(runtime):
        if f.name not in ("learner", "_held", "_participants"):
            assert getattr(moved, f.name) is getattr(runtime, f.name), f.name
