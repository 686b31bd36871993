import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refadamw.averaging import averaging_weight, warmup_factor, x_to_y, y_step_coefficient, y_to_x

T = torch.tensor


def test_constant_lr_gives_uniform_average():
    lr_max, weight_sum = T(0.0, dtype=torch.float64), T(0.0, dtype=torch.float64)
    for t in range(1, 6):
        c, lr_max, weight_sum = averaging_weight(T(0.1, dtype=torch.float64), lr_max, weight_sum)
        torch.testing.assert_close(c, T(1.0 / t, dtype=torch.float64))


def test_warmup_weights_are_lr_max_squared():
    lrs = [0.25, 0.5, 0.75, 1.0, 1.0]
    lr_max, weight_sum = T(0.0, dtype=torch.float64), T(0.0, dtype=torch.float64)
    for t, lr in enumerate(lrs, 1):
        c, lr_max, weight_sum = averaging_weight(T(lr, dtype=torch.float64), lr_max, weight_sum)
        want = lr**2 / sum(x**2 for x in lrs[:t])
        torch.testing.assert_close(c, T(want, dtype=torch.float64))


def test_zero_lr_gives_zero_weight_not_nan():
    c, _, _ = averaging_weight(T(0.0), T(0.0), T(0.0))
    assert c.item() == 0.0


def test_warmup_factor():
    steps = T([0.0, 1.0, 2.0, 4.0, 9.0])
    torch.testing.assert_close(warmup_factor(steps, 4), T([0.0, 0.25, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(warmup_factor(steps, 0), torch.ones(5))


@settings(max_examples=50, deadline=None)
@given(beta1=st.floats(0.05, 0.99), c=st.floats(0.0, 1.0), eta=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_in_place_y_update_equals_the_three_sequences(beta1, c, eta, seed):
    gen = torch.Generator().manual_seed(seed)
    x, z, d = (torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(3))
    y = (1 - beta1) * z + beta1 * x
    # the paper's form
    z_next = z - eta * d
    x_next = (1 - c) * x + c * z_next
    y_next = (1 - beta1) * z_next + beta1 * x_next
    # the kernels' form
    c_t, eta_t = T(c, dtype=torch.float64), T(eta, dtype=torch.float64)
    got = torch.lerp(y, z, c_t) + y_step_coefficient(eta_t, c_t, beta1) * d
    torch.testing.assert_close(got, y_next)
    torch.testing.assert_close(y_to_x(y, z, beta1), x)
    torch.testing.assert_close(x_to_y(x, z, beta1), y)
