import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refadamw.averaging import averaging_weight, offset_coefficients, warmup_factor, x_to_y, y_to_x

T = torch.tensor


def test_constant_lr_gives_uniform_average():
    lr_max, weight_sum = T(0.0, dtype=torch.float64), T(0.0, dtype=torch.float64)
    for t in range(1, 6):
        c, lr_max, weight_sum = averaging_weight(T(0.1, dtype=torch.float64), lr_max, weight_sum, T(t), 0.0)
        torch.testing.assert_close(c, T(1.0 / t, dtype=torch.float64))


def test_averaging_power_weighs_step_t_by_t_to_the_power():
    """w_t = t^r·lr²: with r = 1 and a constant lr, c_t = t / (1 + 2 + … + t) = 2/(t + 1)."""
    lr_max, weight_sum = T(0.0, dtype=torch.float64), T(0.0, dtype=torch.float64)
    for t in range(1, 8):
        c, lr_max, weight_sum = averaging_weight(T(0.1, dtype=torch.float64), lr_max, weight_sum, T(t), 1.0)
        torch.testing.assert_close(c, T(2.0 / (t + 1), dtype=torch.float64))
    c, _, _ = averaging_weight(T(0.1, dtype=torch.float64), lr_max, weight_sum, T(8), 2.5)
    torch.testing.assert_close(c, T(8**2.5 / (8**2.5 + 28), dtype=torch.float64))


def test_warmup_weights_are_lr_max_squared():
    lrs = [0.25, 0.5, 0.75, 1.0, 1.0]
    lr_max, weight_sum = T(0.0, dtype=torch.float64), T(0.0, dtype=torch.float64)
    for t, lr in enumerate(lrs, 1):
        c, lr_max, weight_sum = averaging_weight(T(lr, dtype=torch.float64), lr_max, weight_sum, T(t), 0.0)
        want = lr**2 / sum(x**2 for x in lrs[:t])
        torch.testing.assert_close(c, T(want, dtype=torch.float64))


def test_the_largest_averaging_power_stays_finite_after_a_billion_steps():
    """The weights are taken in Σw's fp64: at r = 16 (the largest allowed) t^r is 1e144 at t = 1e9, and
    c_t is still the plain ratio (about 17/t, as for the average of t^16-weighted iterates)."""
    lr_max, weight_sum = T(1e-3), T(1e-6 * 1e9**17 / 17, dtype=torch.float64)  # Σ_{s<t} s^16·lr² ≈ t^17/17·lr²
    c, _, weight_sum = averaging_weight(T(1e-3), lr_max, weight_sum, T(1e9, dtype=torch.float64), 16.0)
    assert torch.isfinite(weight_sum) and c.dtype == torch.float32
    torch.testing.assert_close(c, T(17 / (1e9 + 17)), rtol=1e-5, atol=0)


def test_zero_lr_gives_zero_weight_not_nan():
    c, _, _ = averaging_weight(T(0.0), T(0.0), T(0.0), T(1), 1.0)
    assert c.item() == 0.0


def test_warmup_factor():
    steps = T([0.0, 1.0, 2.0, 4.0, 9.0])
    torch.testing.assert_close(warmup_factor(steps, 4), T([0.0, 0.25, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(warmup_factor(steps, 0), torch.ones(5))


@settings(max_examples=50, deadline=None)
@given(beta1=st.floats(0.05, 0.99), c=st.floats(0.0, 1.0), eta=st.floats(0.0, 1.0), rho=st.floats(0.0, 1.0),
       repair=st.booleans(), seed=st.integers(0, 2**16))
def test_offset_update_equals_the_three_sequences(beta1, c, eta, rho, repair, seed):
    gen = torch.Generator().manual_seed(seed)
    x, z, d = (torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(3))
    y = (1 - beta1) * z + beta1 * x
    offset = z - y  # what the optimizer stores
    # the paper's form, with the Ref repair z <- z + rho (x - z) first
    if repair:
        z = z + rho * (x - z)
    z_next = z - eta * d
    x_next = (1 - c) * x + c * z_next
    y_next = (1 - beta1) * z_next + beta1 * x_next
    # the kernels' form, on the stored pair (y, z - y)
    f64 = lambda v: T(v, dtype=torch.float64)  # noqa: E731
    k = offset_coefficients(f64(eta), f64(c), beta1, f64(rho) if repair else None)
    got_y = y + k.y_offset * offset + k.y_step * d
    got_offset = k.offset_decay * offset + k.offset_step * d
    torch.testing.assert_close(got_y, y_next)
    torch.testing.assert_close(got_offset, z_next - y_next)
    torch.testing.assert_close(y_to_x(y, offset, beta1), x)
    torch.testing.assert_close(x_to_y(x, offset, beta1), y)


def test_a_skipped_step_is_exactly_the_identity():
    y, offset, d = torch.randn(3, 7).unbind()
    zero = T(0.0)
    k = offset_coefficients(zero, zero, 0.9, zero)
    assert torch.equal(y + k.y_offset * offset + k.y_step * d, y)
    assert torch.equal(k.offset_decay * offset + k.offset_step * d, offset)
