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


# ------------------------------------------------------- stochastic rounding

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from refadamw.precision import (  # noqa: E402
    Salt, random_bits, resolve_state_dtype, rounding_keys, second_moment_dtype, stochastic_round, tensor_key,
    write_back,
)

LOW = [torch.bfloat16, torch.float16]
N_DRAWS = 1 << 16


def _neighbours(x: float, dtype: torch.dtype) -> tuple[float, float]:
    """The two values of ``dtype`` that bracket ``x`` (equal when ``x`` is representable)."""
    near = torch.tensor(x, dtype=torch.float32).to(dtype)
    if near.float().item() == x:
        return x, x
    toward = torch.tensor(float("inf") if x > near.float().item() else float("-inf"), dtype=dtype)
    other = torch.nextafter(near, toward).float().item()
    return tuple(sorted((near.float().item(), other)))


def _key(step=1, salt=Salt.Z_MINUS_Y, ordinal=0, seed=0):
    return rounding_keys(torch.tensor(tensor_key(seed, ordinal), dtype=torch.int32), torch.tensor(float(step)), salt)


finite_fp16_range = st.floats(-60000.0, 60000.0, allow_nan=False, width=32)
tiny = st.floats(-2.0**-13, 2.0**-13, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(x=st.one_of(finite_fp16_range, tiny), dtype=st.sampled_from(LOW), step=st.integers(0, 10**6))
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(x, dtype, step):
    lo, hi = _neighbours(x, dtype)
    rounded = stochastic_round(torch.full((N_DRAWS,), x), dtype, _key(step)).double()
    assert set(rounded.unique().tolist()) <= {lo, hi}
    if lo == hi:
        return
    p = (x - lo) / (hi - lo)
    # The mean of N Bernoulli(p) draws is within 5 standard errors of p.
    bound = 5 * (hi - lo) * max(p * (1 - p), 1 / N_DRAWS) ** 0.5 / N_DRAWS**0.5
    assert abs(rounded.mean().item() - x) <= bound + 1e-12 * abs(x)


@pytest.mark.parametrize("dtype", LOW)
def test_representable_values_and_specials_pass_unchanged(dtype):
    values = torch.tensor([0.0, -0.0, 1.0, -2.5, 0.15625, float("inf"), float("-inf")], dtype=dtype)
    out = stochastic_round(values.float(), dtype, _key())
    assert torch.equal(out, values) and out.dtype == dtype
    assert stochastic_round(torch.tensor([float("nan")]), dtype, _key()).isnan().all()


def test_noise_depends_on_every_part_of_the_key():
    x = torch.full((4096,), 1.0 + 2.0**-9)
    base = stochastic_round(x, torch.bfloat16, _key())
    assert torch.equal(base, stochastic_round(x, torch.bfloat16, _key()))  # deterministic
    for other in (_key(step=2), _key(salt=Salt.PARAM), _key(ordinal=1), _key(seed=1)):
        assert not torch.equal(base, stochastic_round(x, torch.bfloat16, other))


def test_random_bits_are_uniform():
    bits = random_bits(1 << 20, _key())
    for shift in (0, 13, 16, 24):
        byte = (bits >> shift) & 0xFF
        counts = torch.bincount(byte, minlength=256).double()
        chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum().item()
        assert chi2 < 400  # 255 degrees of freedom: mean 255, sd 22.6


@pytest.mark.parametrize("dtype", LOW)
def test_small_updates_accumulate(dtype):
    """200 updates of 1e-4 (about 1/80 of an ulp at 1.0) move the weights by 0.02."""
    weights = torch.ones(4096, dtype=dtype)
    nearest = torch.ones(4096, dtype=dtype)
    for step in range(200):
        write_back(weights, weights.float() - 1e-4, _key(step))
        nearest.copy_(nearest.float() - 1e-4)
    assert torch.equal(nearest, torch.ones_like(nearest))  # round-to-nearest stalls
    moved = 1.0 - weights.double().mean().item()
    assert abs(moved - 0.02) < 0.001


def test_write_back_into_low_precision_needs_a_key():
    with pytest.raises(ValueError, match="rounding key"):
        write_back(torch.zeros(2, dtype=torch.bfloat16), torch.ones(2), None)
    same = torch.zeros(2)
    write_back(same, torch.ones(2), None)
    assert torch.equal(same, torch.ones(2))


def test_stochastic_round_rejects_other_targets():
    with pytest.raises(ValueError, match="bf16 or fp16"):
        stochastic_round(torch.ones(2), torch.float32, _key())


def test_storage_dtypes():
    assert resolve_state_dtype("auto", torch.float64) == torch.float64
    for param_dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert resolve_state_dtype("auto", param_dtype) == torch.bfloat16
    assert resolve_state_dtype("bf16", torch.float64) == torch.bfloat16
    assert second_moment_dtype(torch.float16) == torch.float32  # v is never fp16
    assert second_moment_dtype(torch.bfloat16) == torch.bfloat16
    assert second_moment_dtype(torch.float32) == torch.float32


def test_tensor_key_matches_the_tensor_hash():
    from refadamw.precision import _mix32

    for seed, ordinal in ((0, 0), (1, 5), (2**40 + 3, 77), (-3, 2)):
        word = (seed * 0x27D4EB2F + ordinal) & 0xFFFFFFFF
        word = word - (1 << 32) if word >= 1 << 31 else word
        assert tensor_key(seed, ordinal) == int(_mix32(torch.tensor(word, dtype=torch.int32)))


@pytest.mark.parametrize("dtype", LOW)
def test_compiled_rounding_kernel_matches_the_eager_one(dtype, monkeypatch):
    from refadamw import precision

    monkeypatch.setenv("REFADAMW_COMPILE", "1")
    x = torch.randn(precision.COMPILE_MIN_NUMEL + 5) * 1e-3
    key = _key(3)
    assert precision._rounder(dtype, x.numel()) is not precision._EAGER[dtype]
    assert torch.equal(stochastic_round(x, dtype, key), precision._EAGER[dtype](x, key))


def test_a_failing_compiler_falls_back_to_eager_once(monkeypatch, caplog):
    from refadamw import precision

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setenv("REFADAMW_COMPILE", "1")
    monkeypatch.setattr(precision, "_compiled", {torch.bfloat16: broken})
    monkeypatch.setattr(precision, "_compile_failed", False)
    x = torch.randn(precision.COMPILE_MIN_NUMEL)
    with caplog.at_level("WARNING", logger="refadamw"):
        out = stochastic_round(x, torch.bfloat16, _key())
        stochastic_round(x, torch.bfloat16, _key())
    assert torch.equal(out, precision._EAGER[torch.bfloat16](x, _key()))
    assert sum("torch.compile" in r.getMessage() for r in caplog.records) == 1


def test_compilation_can_be_switched_off(monkeypatch):
    from refadamw import precision

    monkeypatch.setenv("REFADAMW_COMPILE", "0")
    assert precision._rounder(torch.bfloat16, 1 << 30) is precision._EAGER[torch.bfloat16]
