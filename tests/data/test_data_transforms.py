from __future__ import annotations

import numpy as np
import pytest
import torch

from ddprun.data.transforms import Compose, Normalize, ToTensor


def test_to_tensor_uint8_hw_gives_1xhxw_in_unit_range():
    image = np.array([[0, 255], [51, 102]], dtype=np.uint8)
    tensor = ToTensor()(image)
    assert tensor.shape == (1, 2, 2) and tensor.dtype == torch.float32
    assert torch.allclose(tensor[0], torch.tensor([[0.0, 1.0], [0.2, 0.4]]))


def test_to_tensor_hwc_becomes_chw():
    image = np.zeros((4, 5, 3), dtype=np.uint8)
    image[..., 2] = 255
    tensor = ToTensor()(image)
    assert tensor.shape == (3, 4, 5)
    assert tensor[2].eq(1).all() and tensor[:2].eq(0).all()
    assert tensor.is_contiguous()


def test_to_tensor_accepts_tensors_and_float_arrays():
    assert ToTensor()(torch.full((2, 3), 255, dtype=torch.uint8)).eq(1).all()
    floats = np.full((2, 3), 0.5, dtype=np.float64)
    assert ToTensor()(floats).eq(0.5).all()


def test_to_tensor_does_not_alias_a_read_only_source():
    source = np.frombuffer(bytes(range(4)), dtype=np.uint8).reshape(2, 2)
    tensor = ToTensor()(source)
    tensor += 1
    assert source[0, 0] == 0


@pytest.mark.parametrize(
    "bad",
    [
        [[0, 1]],
        "image",
        np.zeros(3, np.uint8),
        np.zeros((1, 1, 1, 1), np.uint8),
        np.zeros((2, 2), np.int32),
    ],
)
def test_to_tensor_rejects_other_input_with_type_error(bad):
    with pytest.raises(TypeError, match="ToTensor"):
        ToTensor()(bad)


def test_normalize_per_channel():
    tensor = torch.stack([torch.full((2, 2), 1.0), torch.full((2, 2), 3.0)])
    out = Normalize(mean=(1.0, 1.0), std=(1.0, 2.0))(tensor)
    assert out[0].eq(0).all() and out[1].eq(1).all()
    assert tensor[1].eq(3).all()  # not in place by default


def test_normalize_single_value_broadcasts_and_inplace():
    tensor = torch.full((3, 2, 2), 0.5)
    out = Normalize(0.5, 0.25, inplace=True)(tensor)
    assert out is tensor and tensor.eq(0).all()


def test_normalize_errors():
    with pytest.raises(ValueError, match="zeros"):
        Normalize((0.0,), (0.0,))
    with pytest.raises(ValueError, match="2 values for a 3-channel"):
        Normalize((0.0, 0.0), (1.0, 1.0))(torch.zeros(3, 2, 2))
    with pytest.raises(TypeError, match="CxHxW"):
        Normalize(0.0, 1.0)(torch.zeros(2, 2))


def test_compose_applies_in_order():
    transform = Compose([ToTensor(), Normalize((0.1307,), (0.3081,))])
    out = transform(np.zeros((28, 28), dtype=np.uint8))
    assert out.shape == (1, 28, 28)
    assert torch.allclose(out, torch.full_like(out, -0.1307 / 0.3081))
    assert "ToTensor()" in repr(transform)
