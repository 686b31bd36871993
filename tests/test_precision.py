import pytest
import torch

from refadamw.precision import compute_dtype, parse_state_dtype


@pytest.mark.parametrize(
    "value, want",
    [
        ("auto", "auto"), ("AUTO", "auto"),
        ("fp32", torch.float32), ("float32", torch.float32), ("torch.float32", torch.float32),
        ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("torch.bfloat16", torch.bfloat16),
        ("fp16", torch.float16), ("float16", torch.float16),
        (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
    ],
)
def test_parse_state_dtype(value, want):
    assert parse_state_dtype(value) == want


@pytest.mark.parametrize("value", ["fp8", "int8", "", "float64", torch.float64, torch.int32])
def test_unknown_state_dtype_is_a_value_error(value):
    with pytest.raises(ValueError, match="state_dtype"):
        parse_state_dtype(value)


@pytest.mark.parametrize("value", [None, 32, 1.0])
def test_state_dtype_of_wrong_type_is_a_type_error(value):
    with pytest.raises(TypeError, match="state_dtype"):
        parse_state_dtype(value)


def test_compute_dtype():
    assert compute_dtype(torch.float64) == torch.float64
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert compute_dtype(dtype) == torch.float32
