"""Both kernel paths against the float64 reference written from SPEC.md §3."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from refadamw import AdamWMiniSF

from .spec_reference import SpecHyper, SpecParam, spec_step

GROUP_A = dict(shapes=[(64, 64), (64,), (3, 5), ()], frozen=[(8, 8)],
               hyper=SpecHyper(lr=1e-2, weight_decay=0.1, warmup_steps=3, averaging_power=1.0))
GROUP_B = dict(shapes=[(32, 8, 4, 4), (16,)], frozen=[],
               hyper=SpecHyper(lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-6, auto_lr=False, block_rows=4))
GROUP_C = dict(shapes=[(128, 40), (7, 3, 2)], frozen=[],
               hyper=SpecHyper(lr=5e-2, min_lr=1e-3, max_lr=2e-2, alpha=0.3, mini=False, averaging_power=2.5))
STEPS = 7


def _options(hp: SpecHyper) -> dict:
    return dict(lr=hp.lr, betas=(hp.beta1, hp.beta2), eps=hp.eps, weight_decay=hp.weight_decay,
                warmup_steps=hp.warmup_steps, auto_lr=hp.auto_lr, min_lr=hp.min_lr, max_lr=hp.max_lr,
                schedulefree_alpha=hp.alpha, mini=hp.mini, block_rows=hp.block_rows,
                schedule_free=hp.schedule_free, averaging_power=hp.averaging_power)


def _grad_for(step: int, group: int, index: int, shape, gen) -> torch.Tensor | None:
    """Gradients with the awkward cases: zero gradients, and a step with none."""
    if (group, index, step) == (0, 1, 3):
        return None  # this tensor gets no gradient on this step
    if (group, index) == (0, 2) and step in (2, 3):
        return torch.zeros(shape, dtype=torch.float64)
    scale = 10.0 if step == 4 else 1.0  # a gradient spike, for the auto-lr
    return torch.randn(shape, generator=gen, dtype=torch.float64) * scale


def run_against_reference(device, dtype, foreach, schedule_free, groups, nan_step=None, state_dtype=None):
    gen = torch.Generator().manual_seed(1)
    ours_groups, spec_groups, tensors = [], [], []
    for g in groups:
        hp = SpecHyper(**{**g["hyper"].__dict__, "schedule_free": schedule_free})
        values = [torch.randn(s, generator=gen, dtype=torch.float64) for s in g["shapes"] + g["frozen"]]
        params = [torch.nn.Parameter(v.to(device, dtype)) for v in values]
        tensors.append(params)
        spec_groups.append((hp, [SpecParam(y=p.detach().to("cpu", torch.float64).clone()) for p in params]))
        ours_groups.append({"params": params, **_options(hp)})
    state_dtype = state_dtype or ("auto" if dtype == torch.float64 else "fp32")  # full-precision state
    opt = AdamWMiniSF(ours_groups, foreach=foreach, state_dtype=state_dtype)
    start = [[p.detach().cpu().to(torch.float64).clone() for p in params] for params in tensors]
    if state_dtype in STATE_ROUNDING:
        paths = [PathLength([sp.y for sp in spec]) for _, spec in spec_groups]

        def compare(pick, what):
            for params, (_, spec), y0, path in zip(tensors, spec_groups, start, paths):
                expected = [pick(sp) for sp in spec]
                assert_displacement_close(params, expected, y0, path.scales(expected),
                                          rel=STATE_ROUNDING[state_dtype], what=what)
    else:
        tol = _tolerance(dtype, state_dtype)

        def compare(pick, what):
            _assert_close(tensors, spec_groups, tol, pick, what)

    for step in range(1, STEPS + 1):
        for gi, (g, params, (hp, spec)) in enumerate(zip(groups, tensors, spec_groups)):
            n_live = len(g["shapes"])
            grads = [_grad_for(step, gi, i, s, gen) for i, s in enumerate(g["shapes"])] + [None] * len(g["frozen"])
            if nan_step == step and gi == 1:
                grads[0] = grads[0].clone()
                grads[0].view(-1)[3] = float("nan")
            for p, grad in zip(params, grads):
                p.grad = None if grad is None else grad.to(device, dtype)
            spec_step(spec, [None if grad is None else grad.to(dtype).to(torch.float64) for grad in grads], hp)
            assert n_live == len(g["shapes"])
        opt.step()
        compare(lambda sp: sp.y, f"y after step {step}")

    if schedule_free:
        opt.eval()
        compare(lambda sp: sp.y if sp.x is None else sp.x, "x after eval()")
    return opt, tensors


def _tolerance(dtype, state_dtype) -> dict:
    """Value tolerance with full-precision state (far below one step's displacement)."""
    return dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)


STATE_ROUNDING = {"bf16": 4 * 2.0**-8, "fp16": 4 * 2.0**-11}
"""Bound on the error that rounding the state into bf16/fp16 adds, relative to the update.

z − y (or m) is rounded to 8 (11) significant bits on every step, unbiasedly. On the fixed cases
below the error reached 1.3 ulps of the tensor's path length (:class:`PathLength`) for bf16 and
fp16 alike, so 4 ulps leaves a 3× margin; an optimizer that never moved a tensor is off by at
least 0.6 of the path length at the last step (39 bf16 ulps)."""

PARAM_SPACING = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
"""Relative spacing of each parameter dtype at its coarsest (just below a power of two)."""


class PathLength:
    """The distance each reference tensor has travelled, ``Σ_t |y_t − y_{t−1}|`` (its largest element).

    Rounding the state adds an error proportional to each step, so this, not the net displacement
    (which cancels when steps change sign), is the scale of that error."""

    def __init__(self, values: list[torch.Tensor]) -> None:
        self.last = [v.clone() for v in values]
        self.length = [torch.zeros_like(v) for v in values]

    def scales(self, values: list[torch.Tensor]) -> list[float]:
        for i, v in enumerate(values):
            self.length[i] += (v - self.last[i]).abs()
            self.last[i] = v.clone()
        return [float(n.max()) if n.numel() else 0.0 for n in self.length]


def assert_displacement_close(params, expected, start, scales, *, rel: float, steps: int = STEPS,
                              what: str = "") -> None:
    """Compare how far each tensor moved, ``y_t − y_0``, against the reference's displacement.

    Elementwise, ``|Δ − Δ_ref| ≤ rel·scale + 2·steps·spacing·max(|y_0|, |y_ref|)``, with ``scale``
    the tensor's path length so far (:class:`PathLength`): ``rel`` bounds the state's rounding
    relative to the updates, and the second term the rounding of the parameter itself, which
    moves it by less than one spacing of its value per step (negligible for fp32/fp64 parameters).
    Comparing values instead would let a tolerance scaled by ``|y|`` swallow the whole update.
    """
    for i, (p, ref, y0, scale) in enumerate(zip(params, expected, start, scales)):
        moved = (p.detach().cpu().to(torch.float64) - y0)
        moved_ref = ref - y0
        if not moved_ref.numel():
            continue
        floor = 2 * steps * PARAM_SPACING[p.dtype] * torch.maximum(y0.abs(), ref.abs())
        bound = rel * scale + floor
        excess = (moved - moved_ref).abs() - bound
        assert (excess <= 0).all(), (
            f"{what}, tensor {i} of shape {tuple(p.shape)}: the displacement differs from the reference's by "
            f"{(moved - moved_ref).abs().max().item():.3g}, allowed {bound.max().item():.3g} "
            f"(the reference moved it by up to {moved_ref.abs().max().item():.3g})")


def _assert_close(tensors, spec_groups, tol, pick, what):
    for params, (_, spec) in zip(tensors, spec_groups):
        for i, (p, sp) in enumerate(zip(params, spec)):
            torch.testing.assert_close(p.detach().cpu().to(torch.float64), pick(sp), **tol,
                                       msg=lambda m: f"{what}, tensor {i} of shape {tuple(p.shape)}: {m}")


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("schedule_free", [True, False], ids=["sf", "momentum"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_matches_spec_reference(device, dtype, foreach, schedule_free):
    run_against_reference(device, dtype, foreach, schedule_free, [GROUP_A, GROUP_B, GROUP_C])


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("schedule_free", [True, False], ids=["sf", "momentum"])
@pytest.mark.parametrize("state_dtype", ["bf16", "fp16"])
def test_low_precision_state_matches_spec_reference(device, state_dtype, foreach, schedule_free):
    run_against_reference(device, torch.float32, foreach, schedule_free, [GROUP_A, GROUP_B, GROUP_C],
                          state_dtype=state_dtype)


@pytest.mark.parametrize("state_dtype", ["bf16", "fp16"])
def test_low_precision_comparison_rejects_a_wrong_optimizer(state_dtype):
    """The low-precision tolerance is smaller than the effects it must see: an optimizer that
    never moves, and one whose lr is 5% off, both fail."""
    groups = [GROUP_A, GROUP_B, GROUP_C]
    with mock.patch.object(AdamWMiniSF, "step", lambda self, closure=None: None):
        with pytest.raises(AssertionError, match="displacement differs"):
            run_against_reference("cpu", torch.float32, True, True, groups, state_dtype=state_dtype)

    def lr_off(hp, options=_options):
        return {**options(hp), "lr": 1.05 * hp.lr}

    with mock.patch(f"{__name__}._options", lr_off):
        with pytest.raises(AssertionError, match="displacement differs"):
            run_against_reference("cpu", torch.float32, True, True, groups, state_dtype=state_dtype)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
def test_non_finite_gradient_skips_only_its_group(device, foreach):
    opt, tensors = run_against_reference(device, torch.float64, foreach, True, [GROUP_A, GROUP_B], nan_step=5)
    stats = [g["stats"] for g in opt.param_groups]
    assert stats[0]["skipped_steps"].item() == 0 and stats[0]["steps"].item() == STEPS
    assert stats[1]["skipped_steps"].item() == 1 and stats[1]["steps"].item() == STEPS - 1
    assert opt.stats()["skipped_steps"].item() == 1


def test_frozen_parameters_get_no_state(device):
    opt, tensors = run_against_reference(device, torch.float32, True, True, [GROUP_A])
    frozen = tensors[0][len(GROUP_A["shapes"]):]
    assert frozen and all(p not in opt.state for p in frozen)
    live = tensors[0][: len(GROUP_A["shapes"])]
    assert all(p in opt.state for p in live)
