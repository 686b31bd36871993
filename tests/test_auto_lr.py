import torch

from refadamw.auto_lr import MAX_RATIO, MIN_RATIO, step_size, update_norm_ema

T = torch.tensor


def test_first_step_takes_the_norm_and_steps_at_lr():
    ema = update_norm_ema(T(0.0), T(5.0), T(True), 0.05)
    assert ema.item() == 5.0
    assert step_size(T(1e-3), ema, T(5.0), None, None).item() == torch.tensor(1e-3).item()


def test_ema_update():
    ema = update_norm_ema(T(2.0), T(4.0), T(False), 0.25)
    assert ema.item() == 2.5


def test_spike_is_damped_but_not_below_the_relative_floor():
    lr = T(1e-2)
    ema = update_norm_ema(T(1.0), T(3.0), T(False), 0.05)  # a 3x spike
    eta = step_size(lr, ema, T(3.0), None, None)
    assert MIN_RATIO * 1e-2 < eta.item() < 0.5 * 1e-2
    huge = step_size(lr, T(1.0), T(1e6), None, None)
    torch.testing.assert_close(huge, lr * MIN_RATIO)


def test_shrinking_gradients_never_raise_the_step_above_the_relative_ceiling():
    eta = step_size(T(1e-2), T(10.0), T(0.1), None, None)
    torch.testing.assert_close(eta, T(1e-2) * MAX_RATIO)


def test_absolute_bounds_override_relative_ones():
    assert step_size(T(1e-2), T(10.0), T(0.1), 1e-6, 3e-2).item() == torch.tensor(3e-2).item()
    assert step_size(T(1e-2), T(1.0), T(1e6), 1e-4, None).item() == torch.tensor(1e-4).item()


def test_upper_bound_wins_when_bounds_cross():
    # absolute min 1e-2 above the relative max lr_t·MAX_RATIO = 1e-3
    assert step_size(T(1e-3), T(1.0), T(1.0), 1e-2, None).item() == torch.tensor(1e-3 * MAX_RATIO).item()


def test_zero_gradient_is_finite():
    eta = step_size(T(1e-3), T(0.0), T(0.0), None, None)
    assert torch.isfinite(eta)
