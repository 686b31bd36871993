"""Both kernel paths against the float64 reference written from SPEC.md §3."""

from __future__ import annotations

import pytest
import torch

from refadamw import AdamWMiniSF

from .spec_reference import SpecHyper, SpecParam, spec_step

GROUP_A = dict(shapes=[(64, 64), (64,), (3, 5), ()], frozen=[(8, 8)],
               hyper=SpecHyper(lr=1e-2, weight_decay=0.1, warmup_steps=3))
GROUP_B = dict(shapes=[(32, 8, 4, 4), (16,)], frozen=[],
               hyper=SpecHyper(lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-6, auto_lr=False, block_rows=4))
GROUP_C = dict(shapes=[(128, 40), (7, 3, 2)], frozen=[],
               hyper=SpecHyper(lr=5e-2, min_lr=1e-3, max_lr=2e-2, alpha=0.3, mini=False))
STEPS = 7


def _options(hp: SpecHyper) -> dict:
    return dict(lr=hp.lr, betas=(hp.beta1, hp.beta2), eps=hp.eps, weight_decay=hp.weight_decay,
                warmup_steps=hp.warmup_steps, auto_lr=hp.auto_lr, min_lr=hp.min_lr, max_lr=hp.max_lr,
                schedulefree_alpha=hp.alpha, mini=hp.mini, block_rows=hp.block_rows,
                schedule_free=hp.schedule_free)


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
    tol = _tolerance(dtype, state_dtype)

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
        _assert_close(tensors, spec_groups, tol, lambda sp: sp.y, f"y after step {step}")

    if schedule_free:
        opt.eval()
        _assert_close(tensors, spec_groups, tol, lambda sp: sp.y if sp.x is None else sp.x, "x after eval()")
    return opt, tensors


def _tolerance(dtype, state_dtype) -> dict:
    if state_dtype in ("bf16", "fp16"):
        # z (or m) is rounded to 8 (11) significant bits each step; the rounding
        # is unbiased, so the error stays within a few ulps of the state.
        ulp = 2.0**-8 if state_dtype == "bf16" else 2.0**-11
        return dict(rtol=4 * ulp, atol=4 * ulp)
    return dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)


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
