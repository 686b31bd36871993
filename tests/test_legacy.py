"""legacy=True against the float64 reference of SPEC.md §2 (tests/seed_reference.py)."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refadamw.compat import LegacyAdamWminiScheduleFree, LegacyRefAdamWminiScheduleFree, legacy
from refadamwmini_schedulefree import RefAdamWminiScheduleFree

from .seed_reference import SeedReference

SHAPES = [(6, 5), (5,), (2, 3, 4), ()]


def _params(shapes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]


def _grads(shapes, steps, seed=1, none_at=None):
    """Per-step float64 gradients with a spike and shrinking norms (so η hits both clamps)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        scale = 50.0 if t == 3 else 0.5 ** min(t, 12)
        out.append([None if (t, i) == none_at else torch.randn(s, generator=gen, dtype=torch.float64) * scale
                    for i, s in enumerate(shapes)])
    return out


def _run(opt, ref, params, grads, signals=(), tol=1e-11):
    """Step both with the same gradients and signals; compare parameters and moments every step."""
    signals = list(signals) or [{}] * len(grads)
    for step_grads, sig in zip(grads, signals):
        for p, g in zip(params, step_grads):
            p.grad = None if g is None else g.to(p.dtype)
        opt.step(**sig)
        ref.step(step_grads, **sig)
        for i, p in enumerate(params):
            torch.testing.assert_close(p.detach().double(), ref.p[i], rtol=tol, atol=tol)
            state = opt.state.get(p)
            if state:
                torch.testing.assert_close(state["exp_avg"].double(), ref.m[i], rtol=tol, atol=tol)
                torch.testing.assert_close(state["exp_avg_sq"].double(), ref.v[i], rtol=tol, atol=tol)
    return ref


def _pair(dtype=torch.float64, shapes=SHAPES, **hyper):
    params = _params(shapes, dtype)
    ref = SeedReference(params, **hyper)
    return LegacyRefAdamWminiScheduleFree(params, **hyper), ref, params


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-11), (torch.float32, 2e-5)])
def test_plain_steps_match_reference(dtype, tol):
    opt, ref, params = _pair(dtype)
    _run(opt, ref, params, _grads(SHAPES, 15, none_at=(5, 1)), tol=tol)
    assert max(ref.etas) == 1e-2 and min(ref.etas) < 1e-3  # both sides of the auto-lr exercised
    assert opt.state[params[0]]["grad_norm_ema"] == pytest.approx(ref.ema[0], rel=tol)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple), min_size=1, max_size=3),
       lr=st.floats(1e-5, 1e-1), beta1=st.floats(0.0, 0.99), beta2=st.floats(0.5, 0.9999),
       eps=st.floats(1e-10, 1e-3), wd=st.floats(0.0, 0.5), alpha=st.floats(0.01, 1.0),
       bounds=st.tuples(st.floats(0.0, 1e-3), st.floats(1e-3, 1.0)), ref_alpha=st.floats(0.0, 1.0),
       losses=st.lists(st.floats(0.1, 10.0), min_size=8, max_size=8), total=st.integers(1, 12))
def test_random_hyperparameters_match_reference(shapes, lr, beta1, beta2, eps, wd, alpha, bounds, ref_alpha,
                                                losses, total):
    hyper = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd, schedulefree_alpha=alpha,
                 min_lr=bounds[0], max_lr=bounds[1], ref_alpha=ref_alpha, ref_max_steps=total)
    opt, ref, params = _pair(torch.float64, shapes, **hyper)
    _run(opt, ref, params, _grads(shapes, 8), [{"loss": x} for x in losses], tol=1e-9)


# Loss sequence that walks the divergence ladder inside the window [0.2T, 0.8T] of T = 20: three
# level-1 rises in a row (ratio 1.3: λ by run length 0.6, 0.8, 1.0), a calm step, ratio 1.6 (level 2),
# ratio 2.5 (level 3), then calm, one more level-1 rise, and a 1.5x jump (level 1) outside the window.
LOSSES = [1.0, 1.0, 1.0, 1.0, 1.3, 1.69, 2.197, 1.0, 1.6, 4.0, 4.0, 5.0, 5.0, 5.0, 5.0, 5.0, 7.5, 7.5, 7.5, 7.5]


def test_injection_walks_the_ladder_and_matches_reference(capsys):
    opt, ref, params = _pair(torch.float64, ref_alpha=0.3)
    _run(opt, ref, params, _grads(SHAPES, 20), [{"loss": x, "max_steps": 20} for x in LOSSES])
    lams = dict(ref.injections)
    assert set(lams) == set(range(4, 17))  # 0.2·20 ≤ t ≤ 0.8·20
    assert [lams[t] for t in range(4, 17)] == [0.3, 0.6, 0.8, 1.0, 0.3, 0.8, 1.0, 0.3, 0.6, 0.3, 0.3, 0.3, 0.3]
    assert opt.controller.divergent_steps == ref.divergent == 0  # t = 17 diverged outside the window
    assert capsys.readouterr().out == ""  # the seed printed one line per injection


def test_injection_from_ref_max_steps_and_without_T():
    opt, ref, params = _pair(torch.float64, ref_max_steps=10, ref_alpha=0.2)
    _run(opt, ref, params, _grads(SHAPES, 10), [{"loss": 1.0}] * 10)
    assert [t for t, _ in ref.injections] == list(range(2, 9))
    opt, ref, params = _pair(torch.float64)  # no T: progress is 0.5, always inside
    _run(opt, ref, params, _grads(SHAPES, 4), [{"loss": 1.0}, {}, {"loss": 3.0}, {"loss": 3.0}])
    assert ref.injections == [(1, 0.5), (3, 1.0), (4, 0.5)]  # 3.0 → 3.0 is calm


def _val_signals(vals, loss=1.0, max_steps=None):
    return [{"loss": loss, "val_loss": v, **({"max_steps": max_steps} if max_steps else {})} for v in vals]


def test_overfit_sets_skip_and_improvements_clear_it():
    rising = [1.0, 1.1, 1.2, 1.3]  # four strictly rising values: skip
    falling = [1.3 - 0.01 * i for i in range(1, 25)]  # K = 10 consecutive falls, K times
    vals = rising + falling
    opt, ref, params = _pair(torch.float64)
    skips = []
    for t, sig in enumerate(_val_signals(vals)):
        _run(opt, ref, params, _grads(SHAPES, 1, seed=t), [sig])
        assert opt.controller.skip == ref.skip
        skips.append(ref.skip)
    assert skips[:3] == [False] * 3 and skips[3] is True
    first_clear = skips.index(False, 3)
    # Improving first holds 10 falls after the peak (index 13), then needs K = 10 such steps in a row.
    assert first_clear == 13 + 9
    injected = {t for t, _ in ref.injections}
    assert injected.isdisjoint(range(4, first_clear + 1)) and first_clear + 1 in injected


@pytest.mark.parametrize("vals, skip", [
    ([1.0, 1.1, 1.2], False), ([1.0, 1.1, 1.1, 1.2], False), ([2.0, 1.0, 1.1, 1.2], False),
    ([0.9, 1.0, 1.1, 1.2], True), ([1.0, 1.1, 1.2, 1.3, 0.5], True)])
def test_overfit_needs_four_strictly_rising_values(vals, skip):
    opt, ref, params = _pair(torch.float64)
    _run(opt, ref, params, _grads(SHAPES, len(vals)), _val_signals(vals))
    assert opt.controller.skip is ref.skip is skip


def test_with_K_of_20_skip_never_clears():
    # K = 20 needs 21 falling values, but only 20 are kept: the seed's skip is then permanent.
    vals = [1.0, 1.1, 1.2, 1.3] + [1.3 - 0.01 * i for i in range(1, 60)]
    opt, ref, params = _pair(torch.float64)
    _run(opt, ref, params, _grads(SHAPES, len(vals)), _val_signals(vals, max_steps=200_000))
    assert opt.controller.skip is ref.skip is True


def test_skip_counter_resets_and_K_follows_max_steps():
    # max_steps = 150_000 gives K = 15; one rise in the middle of the falls restarts the count.
    vals = [1.0, 1.1, 1.2, 1.3] + [1.3 - 0.01 * i for i in range(1, 21)] + [2.0] + [
        1.0 - 0.01 * i for i in range(1, 40)]
    opt, ref, params = _pair(torch.float64)
    for t, sig in enumerate(_val_signals(vals, max_steps=150_000)):
        _run(opt, ref, params, _grads(SHAPES, 1, seed=t), [sig])
        assert (opt.controller.skip, opt.controller.improving_steps) == (ref.skip, ref.counter)
    assert ref.skip is False and opt.controller.improving_steps == 0


@pytest.mark.parametrize("vals", [[1.0], [3.0, 2.0, 1.0], [1.0, 2.0, 1.5, 1.2]])
def test_the_seed_index_error_case_counts_to_the_start(vals):
    with pytest.raises(IndexError):  # the seed, as SPEC §2 describes it
        ref = SeedReference(_params(SHAPES, torch.float64), raise_index_error=True)
        for v in vals:
            ref.step(_grads(SHAPES, 1)[0], val_loss=v)
    opt, ref, params = _pair(torch.float64)
    _run(opt, ref, params, _grads(SHAPES, len(vals)), [{"val_loss": v} for v in vals])
    assert opt.controller.val_history == vals


def test_val_history_keeps_twenty():
    opt, ref, params = _pair(torch.float64)
    vals = [float(v) for v in range(30, 0, -1)]
    _run(opt, ref, params, _grads(SHAPES, 30), [{"val_loss": v} for v in vals])
    assert opt.controller.val_history == vals[-20:]


def test_adamw_variant_has_no_controller_and_matches_reference():
    params = _params(SHAPES, torch.float64)
    ref = SeedReference(params, weight_decay=0.1)
    opt = LegacyAdamWminiScheduleFree(params, weight_decay=0.1)
    _run(opt, ref, params, _grads(SHAPES, 6), [{}] * 6)
    opt.step(loss=1.0, val_loss=2.0, max_steps=5)  # accepted, unused
    assert not hasattr(opt, "controller")


def test_tensor_signals_and_closure():
    params = _params(SHAPES, torch.float64)
    ref = SeedReference(params)
    opt = LegacyRefAdamWminiScheduleFree(params)
    for t, g in enumerate(_grads(SHAPES, 5)):
        def closure():
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            return torch.tensor(7.0)
        out = opt.step(closure, torch.tensor(1.0 + t), None, torch.tensor([2.0 - t]))
        ref.step(g, loss=1.0 + t, val_loss=2.0 - t)
        assert out.item() == 7.0
    for p, r in zip(params, ref.p):
        torch.testing.assert_close(p.detach(), r, rtol=1e-11, atol=1e-11)


def _save_load(opt):
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_continues_exactly_with_controller_state(dtype):
    shapes = [(4, 3), (3,)]
    signals = [{"loss": x, "val_loss": v, "max_steps": 20} for x, v in
               zip(LOSSES, [1.0, 1.1, 1.2, 1.3] + [1.3 - 0.01 * i for i in range(16)])]
    grads = _grads(shapes, 20)

    def run(split):
        params = _params(shapes, dtype)
        opt = LegacyRefAdamWminiScheduleFree(params, lr=1e-2)
        for t, (g, sig) in enumerate(zip(grads, signals)):
            if t == split:
                saved = _save_load(opt)
                params = [torch.nn.Parameter(p.detach().clone()) for p in params]
                opt = LegacyRefAdamWminiScheduleFree(params, lr=1e-2)
                opt.load_state_dict(saved)
            for p, gi in zip(params, g):
                p.grad = gi.to(dtype)
            opt.step(**sig)
        return params, opt

    straight, opt_a = run(split=None)
    resumed, opt_b = run(split=9)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
    assert opt_a.controller.state_dict() == opt_b.controller.state_dict()
    assert opt_b.controller.skip  # the rising val losses set it before the split
    assert all(opt_b.state[p]["exp_avg"].dtype == torch.float32 for p in resumed)  # not cast to bf16


def test_bf16_parameters_update_in_fp32():
    params32 = _params(SHAPES, torch.float32)
    params16 = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in params32]
    opt = LegacyRefAdamWminiScheduleFree(params16, dtype="bf16")
    ref = SeedReference(params16)
    _run(opt, ref, params16, _grads(SHAPES, 3), tol=2e-2)
    assert all(opt.state[p]["exp_avg_sq"].dtype == torch.float32 for p in params16)


def test_modes_are_no_ops_and_it_is_an_optimizer():
    params = _params(SHAPES, torch.float32)
    opt = LegacyRefAdamWminiScheduleFree(params)
    before = [p.detach().clone() for p in params]
    opt.eval()
    opt.train()
    assert isinstance(opt, torch.optim.Optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, params))


def test_legacy_logs_a_one_time_note(caplog, monkeypatch):
    monkeypatch.setattr(legacy, "_noted", set())
    with caplog.at_level("WARNING", logger="refadamw"):
        LegacyRefAdamWminiScheduleFree(_params(SHAPES, torch.float32))
        LegacyRefAdamWminiScheduleFree(_params(SHAPES, torch.float32))
    assert sum("unstable" in r.getMessage() for r in caplog.records) == 1


BAD_ARGS = [
    (dict(lr=-1.0), ValueError, "lr"),
    (dict(lr="1e-3"), TypeError, "lr"),
    (dict(lr=torch.tensor(1e-3)), TypeError, "lr"),
    (dict(betas=(0.9,)), TypeError, "betas"),
    (dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\]"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(min_lr=1e-2, max_lr=1e-3), ValueError, "min_lr"),
    (dict(max_lr=float("nan")), ValueError, "max_lr"),
    (dict(schedulefree_alpha=1.5), ValueError, "schedulefree_alpha"),
    (dict(dtype="fp8"), ValueError, "fp8"),
    (dict(dtype=torch.int32), ValueError, "dtype"),
    (dict(dtype=3), TypeError, "dtype"),
    (dict(ref_alpha=2.0), ValueError, "ref_alpha"),
    (dict(ref_window=(0.2, 0.8)), TypeError, "ref_window"),
    (dict(ref_base_eps="small"), TypeError, "ref_base_eps"),
    (dict(ref_min_eps=None), TypeError, "ref_min_eps"),
    (dict(ref_max_steps=0), ValueError, "ref_max_steps"),
    (dict(ref_max_steps=10.0), ValueError, "ref_max_steps"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_ARGS)
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        LegacyRefAdamWminiScheduleFree(_params(SHAPES, torch.float32), **kwargs)
    with pytest.raises(error, match=match):  # the same through the front door
        RefAdamWminiScheduleFree(_params(SHAPES, torch.float32), legacy=True, **kwargs)


@pytest.mark.parametrize("signals, error, match", [
    (dict(loss="high"), TypeError, "loss"),
    (dict(loss=True), TypeError, "loss"),
    (dict(loss=torch.ones(2)), ValueError, "loss"),
    (dict(val_loss=[1.0]), TypeError, "val_loss"),
    (dict(max_steps=0), ValueError, "max_steps"),
    (dict(max_steps=2.5), ValueError, "max_steps"),
])
def test_bad_step_arguments(signals, error, match):
    params = _params(SHAPES, torch.float32)
    opt = LegacyRefAdamWminiScheduleFree(params)
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    with pytest.raises(error, match=match):
        opt.step(**signals)
    assert all(torch.equal(a, b) for a, b in zip(before, params)) and opt.controller.step == 0


def test_bad_group_and_parameters():
    with pytest.raises(ValueError, match="lr"):
        LegacyRefAdamWminiScheduleFree([{"params": _params(SHAPES, torch.float32), "lr": -1.0}])
    with pytest.raises(TypeError, match="floating point"):
        LegacyRefAdamWminiScheduleFree([torch.zeros(3, dtype=torch.int64)])


def test_bad_state_dicts():
    params = _params(SHAPES, torch.float32)
    opt = LegacyRefAdamWminiScheduleFree(params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step(loss=1.0)
    good = opt.state_dict()
    with pytest.raises(ValueError, match="state_dict"):
        opt.load_state_dict({"state": {}})
    with pytest.raises(ValueError, match="legacy_controller"):
        opt.load_state_dict({k: v for k, v in good.items() if k != "legacy_controller"})
    with pytest.raises(ValueError, match="step"):
        opt.load_state_dict({**good, "legacy_controller": {**good["legacy_controller"], "step": -1}})
    with pytest.raises(ValueError, match="does not come from"):
        opt.load_state_dict({**good, "state": {0: {"z": torch.zeros(1)}}})
    product = RefAdamWminiScheduleFree(params).state_dict()
    with pytest.raises(ValueError):
        opt.load_state_dict(product)
    assert opt.controller.step == 1  # nothing changed
