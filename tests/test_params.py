import numpy as np
import pytest
import torch
from torch import nn

from fedloom.params import (
    ParamSpec,
    bind_flat_parameters,
    decode_vector,
    encode_vector,
    module_to_vector,
    vector_to_module,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_spec_flatten_unflatten_round_trip() -> None:
    model = _model()
    spec = ParamSpec.from_module(model)
    assert spec.size == 3 * 4 + 4 + 4 * 2 + 2
    vec = module_to_vector(model)
    arrays = spec.unflatten(vec)
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(arrays[name], p.detach().numpy())
    assert ParamSpec.from_json(spec.to_json()) == spec


def test_flatten_rejects_wrong_shape() -> None:
    spec = ParamSpec.from_module(_model())
    arrays = {
        n: np.zeros(e.shape, np.float32) for n, e in zip(spec.names, spec.entries, strict=True)
    }
    arrays["0.weight"] = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match=r"0\.weight"):
        spec.flatten(arrays)


def test_vector_to_module_in_place() -> None:
    model = _model()
    before = [id(p) for p in model.parameters()]
    vec = np.arange(ParamSpec.from_module(model).size, dtype=np.float32)
    vector_to_module(vec, model)
    assert [id(p) for p in model.parameters()] == before
    np.testing.assert_array_equal(module_to_vector(model), vec)


def test_encoding_is_raw_little_endian_and_checked() -> None:
    vec = np.array([1.0, -2.5, 3.25], dtype=np.float32)
    data = encode_vector(vec)
    assert data == np.array([1.0, -2.5, 3.25], dtype="<f4").tobytes()
    np.testing.assert_array_equal(decode_vector(data, 3), vec)
    with pytest.raises(ValueError, match="expected 12"):
        decode_vector(data[:-1], 3)


def test_flat_binding_shares_storage_and_accumulates_grads_in_place() -> None:
    model = _model()
    expected = module_to_vector(model)
    binding = bind_flat_parameters(model)
    np.testing.assert_array_equal(binding.vector(), expected)
    binding.load(np.zeros(binding.spec.size, np.float32))
    assert all(float(p.detach().abs().sum()) == 0.0 for p in model.parameters())
    binding.load(expected)
    model(torch.ones(5, 3)).sum().backward()
    reference = _model()
    reference(torch.ones(5, 3)).sum().backward()
    ref_grad = np.concatenate([p.grad.numpy().ravel() for p in reference.parameters()])
    np.testing.assert_allclose(binding.grads.numpy(), ref_grad, rtol=1e-6)
