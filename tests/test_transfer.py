"""Federated transfer learning: pretrained weights, frozen layers, LoRA adapters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fedloom.cli import main
from fedloom.client.learner import SGDSettings, WorkPlan
from fedloom.client.models import build_model
from fedloom.client.pretrain import save_state
from fedloom.client.transfer import LoRALinear, apply_lora, load_pretrained
from fedloom.config import ConfigError, RunConfig, load_config
from fedloom.data import build_federated_dataset
from fedloom.data.mnist_digits import load_mnist_as_digits, mnist_to_digits
from fedloom.engine.simulation import central_test_set, run_simulation
from fedloom.store import RunStore
from fedloom.strategies import build_learner

from .helpers import final_weights, interrupt_after

SMALL = [
    "rounds=3",
    "data.num_clients=4",
    "client.epochs=1",
    "client.steps=3",
    "model.hidden=[32]",
    "eval.max_examples=100",
]


def _pretrained_file(tmp_path: Path, suffix: str = ".safetensors", seed: int = 7) -> Path:
    """A state dict that fits the SMALL model, with weights unlike the run's own init."""
    cfg = load_config(None, [*SMALL, f"seed={seed}"])
    model = build_model(cfg.model, build_federated_dataset(cfg.data, cfg.seed), cfg.seed)
    return save_state(model, tmp_path / f"pre{suffix}")


def _cfg(*extra: str) -> RunConfig:
    return load_config(None, [*SMALL, *extra])


def test_lora_forward_by_hand() -> None:
    """h = W x + b + (α/r) B A x (Hu et al. 2022, Eq. 3) on numbers worked out on paper."""
    base = nn.Linear(2, 2)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        base.bias.copy_(torch.tensor([0.5, -1.0]))
    layer = LoRALinear(base, rank=1, alpha=2.0, generator=torch.Generator().manual_seed(0))
    x = torch.tensor([[1.0, 1.0]])
    # B = 0 at the start: exactly the pretrained layer, W x + b = (3.5, 6).
    assert torch.equal(layer(x), torch.tensor([[3.5, 6.0]]))
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, 0.0]]))  # A x = 1
        layer.lora_B.copy_(torch.tensor([[2.0], [0.0]]))  # B A x = (2, 0)
    # (α/r) = 2: (3.5, 6) + 2 * (2, 0) = (7.5, 6)
    assert torch.equal(layer(x), torch.tensor([[7.5, 6.0]]))
    assert [n for n, _ in layer.named_parameters()] == ["lora_A", "lora_B"]
    assert {n for n, _ in layer.named_buffers()} == {"base.weight", "base.bias"}


def test_lora_model_starts_equal_to_pretrained(tmp_path: Path) -> None:
    path = _pretrained_file(tmp_path)
    cfg = _cfg(f"model.pretrained='{path}'", "client.adapter='lora'", "lora.rank=2")
    data = build_federated_dataset(cfg.data, cfg.seed)
    reference = build_model(cfg.model, data, cfg.seed)
    load_pretrained(reference, path)
    learner = build_learner(cfg, data)
    assert learner.binding.spec.names == [
        "net.1.lora_A",
        "net.1.lora_B",
        "net.3.lora_A",
        "net.3.lora_B",
    ]
    x = torch.from_numpy(data.test.x)
    with torch.no_grad():
        assert torch.equal(learner.model(x), reference(x))


def test_lora_rejects_unknown_layer_and_rank() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ConfigError, match=r"lora.layers '9' matches no linear layer.*0, 2"):
        apply_lora(model, rank=1, alpha=1.0, layers=["9"], generator=g)
    with pytest.raises(ConfigError, match=r"choose lora\.rank <= 2"):
        apply_lora(model, rank=3, alpha=1.0, layers=["2"], generator=g)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_pretrained_file_is_the_starting_model(tmp_path: Path, suffix: str) -> None:
    path = _pretrained_file(tmp_path, suffix)
    cfg = _cfg(f"model.pretrained='{path}'")
    data = build_federated_dataset(cfg.data, cfg.seed)
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, weights_only=True)
    expected = np.concatenate([state[n].numpy().ravel() for n in ["net.1.weight", "net.1.bias"]])
    start = build_learner(cfg, data).initial_vector()
    np.testing.assert_array_equal(start[: expected.size], expected)
    assert not np.array_equal(start, build_learner(_cfg(), data).initial_vector())


def test_wrong_shapes_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _pretrained_file(tmp_path)  # hidden [32]
    cfg = _cfg(f"model.pretrained='{path}'", "model.hidden=[16]")
    data = build_federated_dataset(cfg.data, cfg.seed)
    with pytest.raises(ConfigError) as err:
        build_learner(cfg, data)
    message = str(err.value)
    assert "\n" not in message
    assert "'net.1.weight' has shape (32, 64) in the file but (16, 64) in the model" in message
    # The command: one line on stderr, exit status 2, no traceback.
    args = ["run", "--out", str(tmp_path / "run")]
    for item in [*SMALL, f"model.pretrained={path}", "model.hidden=[16]"]:
        args += ["--set", item]
    assert main(args) == 2
    stderr = capsys.readouterr().err.strip()
    assert "does not fit the configured model" in stderr and "Traceback" not in stderr
    # Not a state dict, and a missing file: also one line each.
    junk = tmp_path / "junk.pt"
    torch.save([1, 2, 3], junk)
    for bad, expected_text in ((junk, "is not a state dict"), (tmp_path / "no.pt", "not exist")):
        with pytest.raises(ConfigError, match=expected_text):
            build_learner(_cfg(f"model.pretrained='{bad}'"), data)


def test_freeze_keeps_layers_bit_identical_and_out_of_the_vector(tmp_path: Path) -> None:
    path = _pretrained_file(tmp_path)
    cfg = _cfg(f"model.pretrained='{path}'", "model.freeze=['net.1']")
    data = build_federated_dataset(cfg.data, cfg.seed)
    learner = build_learner(cfg, data)
    assert learner.binding.spec.names == ["net.3.weight", "net.3.bias"]
    frozen = {k: v.clone() for k, v in learner.model.named_buffers()}
    assert set(frozen) == {"net.1.weight", "net.1.bias"}
    start = learner.initial_vector()
    out = learner.train(
        start=start,
        data=data.clients[0].train,
        plan=WorkPlan(epochs=2, max_steps=None, straggler=False),
        batch_size=8,
        sgd=SGDSettings(lr=0.5, momentum=0.9, weight_decay=0.01),
        generator=torch.Generator().manual_seed(0),
    )
    assert not np.array_equal(out.weights, start)  # the head trained
    for name, tensor in learner.model.named_buffers():
        assert torch.equal(tensor, frozen[name]), name  # the body did not move one bit

    # A whole run uploads only the head and ends with the file's body untouched.
    summary = run_simulation(cfg, tmp_path / "run")
    head = learner.num_parameters
    first = summary["history"][0]
    assert first["bytes_up"] == 4 * 4 * head and first["bytes_down"] == 4 * 4 * head
    assert final_weights(tmp_path / "run").size == head
    again = build_learner(cfg, data)
    for name, tensor in again.model.named_buffers():
        assert torch.equal(tensor, frozen[name]), name
    # The recorded accuracy is the file's frozen body with the federated head.
    test_set = central_test_set(data, cfg)
    central = again.evaluate(final_weights(tmp_path / "run"), test_set, cfg.eval.batch_size)
    assert central["accuracy"] == summary["final"]["accuracy"]


def test_freeze_refusals(tmp_path: Path) -> None:
    data = build_federated_dataset(_cfg().data, 0)
    with pytest.raises(ConfigError, match=r"model\.freeze prefix 'net\.9' matches no"):
        build_learner(_cfg("model.freeze=['net.9']"), data)
    with pytest.raises(ConfigError, match="nothing would train"):
        build_learner(_cfg("model.freeze=['net']"), data)


def test_lora_sends_fewer_bytes_per_round(tmp_path: Path) -> None:
    path = _pretrained_file(tmp_path)
    full = run_simulation(_cfg(f"model.pretrained='{path}'", "rounds=1"), tmp_path / "full")
    lora = run_simulation(
        _cfg(f"model.pretrained='{path}'", "rounds=1", "client.adapter='lora'", "lora.rank=2"),
        tmp_path / "lora",
    )
    full_params = 64 * 32 + 32 + 32 * 10 + 10
    lora_params = 2 * (64 + 32) + 2 * (32 + 10)
    assert full["history"][0]["bytes_up"] == 4 * 4 * full_params
    assert lora["history"][0]["bytes_up"] == 4 * 4 * lora_params
    assert lora["history"][0]["bytes_down"] * 8 < full["history"][0]["bytes_down"]


def test_lora_resume_equals_uninterrupted(tmp_path: Path) -> None:
    path = _pretrained_file(tmp_path)
    overrides = [f"model.pretrained='{path}'", "client.adapter='lora'", "lora.rank=2"]
    whole = run_simulation(_cfg(*overrides), tmp_path / "whole")
    interrupt_after(_cfg(*overrides), tmp_path / "cut", 2)
    with RunStore.open(tmp_path / "cut") as store:
        assert [r["round"] for r in store.history()] == [1, 2]
    resumed = run_simulation(_cfg(), tmp_path / "cut", resume=True)
    np.testing.assert_array_equal(
        final_weights(tmp_path / "cut"), final_weights(tmp_path / "whole")
    )
    assert [r["accuracy"] for r in resumed["history"]] == [r["accuracy"] for r in whole["history"]]


def test_personal_head_over_frozen_body(tmp_path: Path) -> None:
    """Layer groups: body frozen, head personal (FedPer), nothing else travels."""
    path = _pretrained_file(tmp_path)
    cfg = _cfg(
        f"model.pretrained='{path}'",
        "model.hidden=[32,16]",
        "strategy=fedper",
        "data.client_test_fraction=0.2",
    )
    with pytest.raises(ConfigError, match="does not fit"):
        run_simulation(cfg, tmp_path / "bad")
    cfg = _cfg("model.hidden=[32,16]")
    data = build_federated_dataset(cfg.data, cfg.seed)
    save_state(build_model(cfg.model, data, 3), tmp_path / "deep.pt")
    cfg = _cfg(
        f"model.pretrained='{tmp_path / 'deep.pt'}'",
        "model.hidden=[32,16]",
        "model.freeze=['net.1']",
        "strategy=fedper",
        "personal.layers=['net.5']",
        "data.client_test_fraction=0.2",
        "rounds=1",
    )
    summary = run_simulation(cfg, tmp_path / "run")
    shared = 32 * 16 + 16  # net.3 only: net.1 frozen, net.5 personal
    assert summary["history"][0]["bytes_up"] == 4 * 4 * shared
    with pytest.raises(ValueError, match=r"personal layer prefix 'net\.1' matches no parameter"):
        run_simulation(
            cfg.model_copy(
                update={"personal": cfg.personal.model_copy(update={"layers": ["net.1"]})}
            ),
            tmp_path / "frozen-personal",
        )


def test_mnist_to_digits_counts_blocks() -> None:
    """A filled square fills every 4x4 block: all 16; an empty image is all 0."""
    image = np.zeros((28, 28), dtype=np.uint8)
    image[4:20, 6:22] = 255
    out = mnist_to_digits(np.stack([image, np.zeros_like(image)]))
    assert out.shape == (2, 64)
    np.testing.assert_array_equal(out[0], np.full(64, 16.0, dtype=np.float32))
    np.testing.assert_array_equal(out[1], np.zeros(64, dtype=np.float32))
    bar = np.zeros((28, 28), dtype=np.uint8)
    bar[2:26, 13:15] = 255  # a thin "1" stays thin: only the middle columns are set
    grid = mnist_to_digits(bar[None])[0].reshape(8, 8)
    assert grid[:, 0].sum() == 0 and grid[:, 7].sum() == 0 and grid[:, 3:5].sum() > 0
    assert set(np.unique(grid)) <= set(range(17))


def test_mnist_as_digits_on_the_real_set(shared_data: Path) -> None:
    mnist = shared_data / "mnist"
    if not mnist.is_dir():
        pytest.skip(f"{mnist} is absent")
    data = load_mnist_as_digits(mnist)
    assert data.x.shape == (10000, 64) and data.x.min() == 0.0 and data.x.max() == 1.0
    assert np.array_equal(np.unique(data.x * 16), np.arange(17, dtype=np.float32))
    assert json.dumps(sorted(set(data.y.tolist()))) == json.dumps(list(range(10)))


def test_python_api_refuses_transfer_keys_for_an_own_model(tmp_path: Path) -> None:
    import fedloom

    rng = np.random.default_rng(0)
    parts = [(rng.normal(size=(8, 4)).astype(np.float32), rng.integers(0, 2, 8)) for _ in "ab"]
    with pytest.raises(ValueError, match=r"client\.adapter applies to the built-in models"):
        fedloom.simulate(
            model=lambda: nn.Linear(4, 2),
            clients=parts,
            rounds=1,
            config={"client": {"adapter": "lora"}},
            out=tmp_path / "run",
        )


def test_lora_with_local_dp_is_refused_before_training() -> None:
    from fedloom.strategies import check_composition

    with pytest.raises(ConfigError, match="no per-example gradients for LoRA layers"):
        check_composition(_cfg("client.adapter='lora'", "privacy.local_dp=true"))
    check_composition(_cfg("model.freeze=['net.1']", "privacy.local_dp=true"))


def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = magic.to_bytes(4, "big") + np.asarray(array.shape, dtype=">u4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_pretrain_command_writes_a_file_the_run_starts_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fedloom pretrain` on a tiny MNIST-format directory, then a run from its file."""
    rng = np.random.default_rng(0)
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    _write_idx(mnist / "t10k-images-idx3-ubyte", 0x803, rng.integers(0, 256, (30, 28, 28)))
    _write_idx(mnist / "t10k-labels-idx1-ubyte", 0x801, rng.integers(0, 10, 30))
    out = tmp_path / "pre.safetensors"
    args = ["pretrain", "--mnist", str(mnist), "--out", str(out), "--epochs", "1"]
    assert main([*args, "--set", "model.hidden=[32]"]) == 0
    assert "zero-shot accuracy on the digits test set" in capsys.readouterr().out
    summary = run_simulation(_cfg(f"model.pretrained='{out}'", "rounds=1"), tmp_path / "run")
    assert summary["rounds_completed"] == 1
    assert main([*args, "--set", "data.name='synthetic'"]) == 2
    assert "set data.name = 'digits'" in capsys.readouterr().err


@pytest.mark.slow
def test_mnist_pretraining_speeds_up_digits_and_lora_sends_10x_less(
    shared_data: Path, tmp_path: Path
) -> None:
    """Acceptance (issue 13, item 3), shortened: the README's table in 15 rounds."""
    from fedloom.client.pretrain import DEFAULT_BATCH_SIZE, DEFAULT_SGD, pretrain_model

    example = Path(__file__).resolve().parents[1] / "examples" / "transfer_digits_lora.toml"
    cfg = load_config(example, ["rounds=15"])
    target = build_federated_dataset(cfg.data, cfg.seed)
    source = load_mnist_as_digits(shared_data / "mnist")
    model = pretrain_model(
        cfg, target, source, epochs=5, sgd=DEFAULT_SGD, batch_size=DEFAULT_BATCH_SIZE
    )
    path = save_state(model, tmp_path / "pre.safetensors")

    def run(name: str, *extra: str) -> dict[str, Any]:
        c = load_config(example, ["rounds=15", f"model.pretrained='{path}'", *extra])
        return run_simulation(c, tmp_path / name)

    scratch = run("scratch", "model.pretrained=''", "client.adapter='none'", "client.lr=0.1")
    full = run("full", "client.adapter='none'", "client.lr=0.1")
    lora = run("lora")
    to_95 = [s["metrics"]["rounds_to_target"] for s in (scratch, full, lora)]
    assert to_95[1] is not None and to_95[2] is not None  # both reach 95 % in 15 rounds
    assert to_95[0] is None or to_95[1] + 3 <= to_95[0]  # clearly fewer rounds than scratch
    assert full["history"][0]["bytes_up"] >= 10 * lora["history"][0]["bytes_up"]


def test_pool_engine_equals_inprocess_with_lora(tmp_path: Path) -> None:
    """Pool workers rebuild the frozen backbone from the file themselves."""
    path = _pretrained_file(tmp_path)
    base = [f"model.pretrained='{path}'", "client.adapter='lora'", "lora.rank=2", "rounds=2"]
    run_simulation(_cfg(*base), tmp_path / "inproc")
    run_simulation(_cfg(*base, "engine.name='pool'", "engine.workers=2"), tmp_path / "pool")
    np.testing.assert_array_equal(
        final_weights(tmp_path / "pool"), final_weights(tmp_path / "inproc")
    )
