"""The lr-free step size (refadamw.lr_free): its equations against a float64 reference recomputed from the
run's own iterates, its semantics, group independence, the fused backward pass and resume."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from refadamw import AdamWMiniSF, RefAdamWMiniSF, fused_backward, lr_free
from refadamw.controller import Decision


def _model(seed=0, width=32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, width), torch.nn.GELU(), torch.nn.Linear(width, 1))


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 12, generator=g)
    return x, x[:, :3].sum(1, keepdim=True).sin()


def _loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


PATHS = {"cpu kernel": {}, "tensor ops": {"fused": False}, "per tensor": {"foreach": False}}
"""The three ways a step computes the lr-free terms: in the CPU kernel's pass (the default on CPU), with
multi-tensor ops, and tensor by tensor."""


@pytest.mark.parametrize("path", PATHS)
def test_estimate_matches_a_float64_reference(path):
    """d, r, s and the lagged d̄ follow the module docstring's equations, recomputed in float64 from y, δ and g
    seen at each step (taken just before it), with z = y + δ and x0 the initial values, every STRIDE-th
    element."""
    model = _model()
    x, y = _data()
    opt = AdamWMiniSF(model.parameters(), lr=None, warmup_steps=5, state_dtype="fp32", **PATHS[path])
    params = list(model.parameters())
    beta3 = math.sqrt(0.999)
    x0 = [p.detach().reshape(-1)[::lr_free.STRIDE].double().clone() for p in params]
    s = [torch.zeros_like(a) for a in x0]
    d, r, lagged = lr_free.D0, 0.0, lr_free.D0
    for t in range(1, 81):
        # the step this iteration takes uses d̄ as it stands before it
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(lr_free.STEP_FRACTION * lagged, rel=1e-2), t
        opt.zero_grad()
        _loss(model, x, y).backward()
        a = (d / lr_free.D0) ** 2 * min(1.0, t / 5)
        dots = 0.0
        for i, p in enumerate(params):
            z = p.detach().double() + (opt.state[p]["z_minus_y"].double() if opt.state.get(p) else 0.0)
            g = p.grad.double().reshape(-1)[::lr_free.STRIDE]
            dots += float((g * (x0[i] - z.reshape(-1)[::lr_free.STRIDE])).sum())
            s[i] = beta3 * s[i] + a * g
        r = beta3 * r + a * dots
        l1 = sum(float(v.abs().sum()) for v in s)
        d = max(d, r / l1) if l1 > 0 else d
        lagged += (d - lagged) / lr_free.LAG_STEPS
        opt.step()
        # x0 − z is a difference of fp32 weights that moved by ~d: rounding of the weights (not of the
        # estimate) limits the agreement to ~1e-3, far below the ×10^4 growth of d being checked
        got = float(opt.param_groups[0]["stats"]["lr_free_d"])
        assert got == pytest.approx(d, rel=1e-2), t
        assert float(opt.param_groups[0]["stats"]["lr_free_numerator"]) == pytest.approx(r, rel=1e-2, abs=1e-12)
        assert float(opt.param_groups[0]["stats"]["lr_free_d_lagged"]) == pytest.approx(lagged, rel=1e-2), t
    assert d > 100 * lr_free.D0  # the estimate moved: the comparison above is not of constants
    assert lagged < d / 2  # and the step lags well behind it: d̄ = d would fail the check above
    for i, p in enumerate(params):
        torch.testing.assert_close(opt.state[p]["lr_free_sum"].double(), s[i], rtol=1e-2, atol=1e-2 * float(s[i].abs().max()))
    # the step size in force is lr_free_scale·STEP_FRACTION·d̄, shown in param_groups
    lagged_got = float(opt.param_groups[0]["stats"]["lr_free_d_lagged"])
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(lr_free.STEP_FRACTION * lagged_got, rel=1e-6)


@pytest.mark.parametrize("cls", [AdamWMiniSF, RefAdamWMiniSF])
@pytest.mark.parametrize("state_dtype", ["fp32", "bf16"])
def test_the_cpu_kernel_adds_the_terms_the_tensor_ops_add(cls, state_dtype, monkeypatch):
    """The CPU kernel's pass (one call for the group, or after the controller's norms) against the multi-tensor
    ops: the same d, r and s to fp32 summation order, over blocked tensors of several work items, per-element
    ones, and a step a NaN gradient skips (s must stay as it was)."""

    def run(fused: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(300, 400), torch.nn.Tanh(), torch.nn.Linear(400, 3))
        groups = [{"params": [model[0].weight, model[2].weight]},
                  {"params": [model[0].bias, model[2].bias], "mini": False}]  # one v per element
        kw = {"total_steps": 40, "ref_alpha": 0.0} if cls is RefAdamWMiniSF else {}
        opt = cls(groups, lr=None, lr_free_scale=2.0, warmup_steps=3, state_dtype=state_dtype, fused=fused, **kw)
        x = torch.randn(64, 300, generator=torch.Generator().manual_seed(1))
        for step in range(14):
            opt.zero_grad()
            _loss(model, x, x[:, :3].sin()).backward()
            if step == 9:
                model[0].weight.grad[0, 0] = float("nan")
                skipped = groups[0]["params"]  # the hygiene gate is per group: the biases' group steps
                before = [opt.state[p]["lr_free_sum"].clone() for p in skipped]
                stats_before = {k: v.clone() for k, v in groups[0]["stats"].items() if k in lr_free.STAT_KEYS}
            opt.step()
            if step == 9:
                for p, old in zip(skipped, before):
                    assert torch.equal(opt.state[p]["lr_free_sum"], old)
                for key, old in stats_before.items():  # d, r and the lag stand still on a skipped step
                    assert torch.equal(groups[0]["stats"][key], old), key
                assert not torch.equal(groups[0]["stats"]["lr_free_d_lagged"], groups[0]["stats"]["lr_free_d"])
        return opt, model

    reads = []
    real_read = lr_free.Observation.read
    monkeypatch.setattr(lr_free.Observation, "read", lambda self, *a: (reads.append(1), real_read(self, *a)))
    kernel, model_k = run(True)
    assert not reads  # every tensor took the kernel: the comparison below is of the two paths
    ops, model_o = run(False)
    assert reads
    for gk, go in zip(kernel.param_groups, ops.param_groups):
        assert float(gk["stats"]["lr_free_d"]) > 10 * lr_free.D0  # the estimate moved
        for key in lr_free.STAT_KEYS:
            torch.testing.assert_close(gk["stats"][key], go["stats"][key], rtol=1e-4, atol=0)
    for p, q in zip(model_k.parameters(), model_o.parameters()):
        for key in lr_free.STATE_KEYS:
            torch.testing.assert_close(kernel.state[p][key], ops.state[q][key], rtol=1e-4, atol=1e-9)


def test_first_step_is_the_fraction_of_scale_times_d0_times_warmup():
    for scale in (1.0, 3.0):
        model = _model()
        x, y = _data()
        before = [p.detach().clone() for p in model.parameters()]
        opt = AdamWMiniSF(model.parameters(), lr=None, lr_free_scale=scale, warmup_steps=0, state_dtype="fp32")
        _loss(model, x, y).backward()
        opt.step()
        assert float(opt.stats()["lr"]) == pytest.approx(lr_free.STEP_FRACTION * scale * lr_free.D0, rel=1e-6)
        moved = max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before))
        assert moved < 10 * scale * lr_free.D0


def test_a_number_lr_is_exactly_honoured():
    model = _model()
    opt = AdamWMiniSF(model.parameters(), lr=1e-3)
    assert opt.param_groups[0]["lr_free"] is False and opt.param_groups[0]["lr"] == 1e-3
    x, y = _data()
    _loss(model, x, y).backward()
    opt.step()
    assert opt.param_groups[0]["lr"] == 1e-3 and "lr_free_d" not in opt.param_groups[0]["stats"]
    assert not any(k.startswith("lr_free") for k in opt.state[next(model.parameters())])


def test_lr_free_true_warns_that_a_passed_lr_is_unused():
    with pytest.warns(UserWarning, match=r"lr_free=True: the lr passed \(0.0001\) is not used"):
        opt = AdamWMiniSF(_model().parameters(), lr=1e-4, lr_free=True)
    assert opt.param_groups[0]["lr_free"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdamWMiniSF(_model().parameters(), lr=None)


def test_averaging_power_defaults_to_one_lr_free_and_zero_with_a_fixed_lr():
    """``averaging_power=None`` (the default) is settled per group by its mode; a given value is kept, and the
    lr-free default trains exactly as ``averaging_power=1`` does, not as 0."""
    a, b = _model(0), _model(5, width=8)
    opt = AdamWMiniSF([{"params": a.parameters()}, {"params": b.parameters(), "lr": 1e-3}], lr=None)
    assert [g["averaging_power"] for g in opt.param_groups] == [lr_free.AVERAGING_POWER, 0.0] == [1.0, 0.0]
    assert AdamWMiniSF(_model().parameters(), lr=None, averaging_power=0.0).param_groups[0]["averaging_power"] == 0.0
    assert AdamWMiniSF(_model().parameters(), lr=1e-3, averaging_power=2.0).param_groups[0]["averaging_power"] == 2.0
    x, y = _data()

    def averaged(**options):
        model = _model()
        opt = AdamWMiniSF(model.parameters(), lr=None, warmup_steps=3, **options)
        for _ in range(30):
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()
        with opt.averaged():
            return [p.detach().clone() for p in model.parameters()]

    default, one, zero = averaged(), averaged(averaging_power=1.0), averaged(averaging_power=0.0)
    assert all(torch.equal(p, q) for p, q in zip(default, one))
    assert not all(torch.equal(p, q) for p, q in zip(default, zero))


def test_state_is_under_a_tenth_of_a_byte_per_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    opt = AdamWMiniSF(model.parameters(), lr=None)
    sum(p.sum() for p in model.parameters()).backward()
    opt.step()
    n = sum(p.numel() for p in model.parameters())
    extra = sum(t.numel() * t.element_size() for st in opt.state.values() for k, t in st.items() if k in lr_free.STATE_KEYS)
    assert 0 < extra / n <= 0.1


def test_each_group_has_its_own_estimate():
    """A group's estimate and trajectory are bit for bit the same whether another group trains beside it."""
    x, y = _data()

    def run(with_other: bool):
        a, b = _model(0), _model(5, width=8)
        groups = [{"params": a.parameters()}] + ([{"params": b.parameters(), "lr_free_scale": 4.0}] if with_other else [])
        opt = AdamWMiniSF(groups, lr=None, warmup_steps=3)
        for _ in range(15):
            opt.zero_grad()
            loss = _loss(a, x, y) + (_loss(b, x, 2 * y) if with_other else 0)
            loss.backward()
            opt.step()
        return opt, a

    alone, model_alone = run(False)
    both, model_both = run(True)
    assert torch.equal(alone.param_groups[0]["stats"]["lr_free_d"], both.param_groups[0]["stats"]["lr_free_d"])
    for p, q in zip(model_alone.parameters(), model_both.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(both.param_groups[0]["stats"]["lr_free_d"], both.param_groups[1]["stats"]["lr_free_d"])


@pytest.mark.parametrize("cls", [AdamWMiniSF, RefAdamWMiniSF])
def test_fused_backward_pass_is_bit_exact(cls):
    x, y = _data()

    def run(fused: bool):
        model = torch.nn.Sequential(torch.nn.Linear(12, 600), torch.nn.GELU(), torch.nn.Linear(600, 1))
        torch.manual_seed(0)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.1)
        kw = {"total_steps": 20, "ref_alpha": 0.0} if cls is RefAdamWMiniSF else {}  # λ would apply a step later
        # lr_free_scale=2 so that d grows far from D0 within the 12 steps
        opt = cls(model.parameters(), lr=None, lr_free_scale=2.0, warmup_steps=3, fused_back_pass=fused, **kw)
        if fused:
            fused_backward(model, opt)
        for _ in range(12):
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()
        return model, opt

    (m1, o1), (m2, o2) = run(False), run(True)
    assert torch.equal(o1.param_groups[0]["stats"]["lr_free_d"], o2.param_groups[0]["stats"]["lr_free_d"])
    assert float(o1.param_groups[0]["stats"]["lr_free_d"]) > 10 * lr_free.D0
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_resume_is_bit_exact_and_old_checkpoints_keep_their_fixed_lr():
    x, y = _data()
    model = _model()
    opt = RefAdamWMiniSF(model.parameters(), lr=None, total_steps=30)

    def steps(m, o, n):
        for _ in range(n):
            o.zero_grad()
            _loss(m, x, y).backward()
            o.step()

    steps(model, opt, 10)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    steps(model, opt, 10)
    other = _model(3)
    other.load_state_dict(saved_model)
    resumed = RefAdamWMiniSF(other.parameters(), lr=None, total_steps=30)
    resumed.load_state_dict(saved_opt)
    steps(other, resumed, 10)
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)
    # a checkpoint written before lr-free existed: its groups had a fixed lr, and keep it
    fixed_model = _model()
    fixed = AdamWMiniSF(fixed_model.parameters(), lr=2e-3)
    steps(fixed_model, fixed, 2)
    old = fixed.state_dict()
    for group in old["param_groups"]:
        group.pop("lr_free"), group.pop("lr_free_scale")
    fresh = AdamWMiniSF(_model().parameters(), lr=None)
    fresh.load_state_dict(old)
    assert fresh.param_groups[0]["lr_free"] is False and fresh.param_groups[0]["lr"] == 2e-3


def test_a_checkpoint_from_before_the_lag_resumes_stepping_with_its_d():
    """Checkpoints written before ``lr_free_d_lagged`` existed stepped with d itself: they resume from d̄ = d."""
    x, y = _data()
    model = _model()
    opt = AdamWMiniSF(model.parameters(), lr=None, warmup_steps=2)
    for _ in range(20):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
    old = opt.state_dict()
    d = old["param_groups"][0]["stats"]["lr_free_d"].clone()
    assert float(d) > 2 * float(old["param_groups"][0]["stats"]["lr_free_d_lagged"])  # the two differ here
    del old["param_groups"][0]["stats"]["lr_free_d_lagged"]
    resumed = AdamWMiniSF(_model().parameters(), lr=None, warmup_steps=2)
    resumed.load_state_dict(old)
    assert torch.equal(resumed.param_groups[0]["stats"]["lr_free_d_lagged"], d)
    _loss(model, x, y).backward()
    for p, q in zip(resumed.param_groups[0]["params"], model.parameters()):
        p.grad = q.grad
    resumed.step()
    assert float(resumed.stats()["lr"]) == pytest.approx(lr_free.STEP_FRACTION * float(d), rel=1e-6)


def _scripted(opt, pull: float, skip: bool, fused: bool) -> None:
    """Make the controller answer with ``pull`` and ``skip`` (level 3): in ``step()`` through ``decide``; in the
    fused backward pass through ``standing``, the decision the next backward applies."""
    decision = Decision(torch.tensor(0.0), torch.tensor(pull), torch.tensor(skip), torch.tensor(3))
    if fused:
        opt.controller.standing = lambda: decision._replace(skip=torch.tensor(False))
    else:
        opt.controller.decide = lambda signals, max_steps=None: decision


@pytest.mark.parametrize(("path", "skip"), [*((p, s) for p in PATHS for s in (False, True)), ("fused backward", False)])
def test_a_pull_cuts_the_step_size(path, skip):
    """On a step where the controller pulls z toward x by ρ, the lagged d̄, and with it the next step's size, ends
    at (1 − REPAIR_CUT·ρ) of what the same step gives without the pull, on a skipped step too, where the pull
    acts as well; d and r are those of the step without the pull (its terms are read before the pull moves z).
    (The fused backward pass skips through the controller's ``spike_so_far``, not a standing decision.)"""
    x, y = _data()
    fused = path == "fused backward"

    def run(pull: float):
        model = _model()
        opt = RefAdamWMiniSF(model.parameters(), lr=None, warmup_steps=3, total_steps=60, ref_alpha=0.0,
                             fused_back_pass=fused, **PATHS.get(path, {}))
        if fused:
            fused_backward(model, opt)
        for t in range(31):
            if t == 30:
                _scripted(opt, pull, skip, fused)
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()
        return opt.param_groups[0]

    plain, pulled = run(0.0), run(0.5)
    assert float(plain["stats"]["lr_free_d"]) > 10 * lr_free.D0  # the estimate moved: its cut is not of D0
    kept = 1 - lr_free.REPAIR_CUT * 0.5
    assert kept == 0.75  # REPAIR_CUT = 0.5: a cut of 0 would pass the comparisons below
    for key in ("lr_free_d", "lr_free_numerator"):
        assert torch.equal(pulled["stats"][key], plain["stats"][key]), key
    lagged = float(plain["stats"]["lr_free_d_lagged"])
    assert float(pulled["stats"]["lr_free_d_lagged"]) == pytest.approx(kept * lagged, rel=1e-6)
    assert float(pulled["lr"]) == pytest.approx(kept * float(plain["lr"]), rel=1e-6)


def test_a_pull_on_a_non_finite_step_leaves_the_estimate():
    """A NaN gradient changes nothing, the estimate included: the kernels do not pull there, and nor is d̄ cut."""
    x, y = _data()
    model = _model()
    opt = RefAdamWMiniSF(model.parameters(), lr=None, warmup_steps=3, total_steps=60)
    for _ in range(20):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
    before = {k: v.clone() for k, v in opt.param_groups[0]["stats"].items() if k in lr_free.STAT_KEYS}
    _scripted(opt, 1.0, True, False)
    opt.zero_grad()
    _loss(model, x, y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    opt.step()
    for key, value in before.items():
        assert torch.equal(opt.param_groups[0]["stats"][key], value), key


def test_a_lasting_divergence_cuts_the_step_size_and_repair_false_does_not():
    """The real controller, fed a loss blown up ×10⁴ for eight steps, pulls and so cuts the step size d̄ (d
    stands); with ``repair=False`` the step size never decreases."""
    x, y = _data()

    def run(repair: bool):
        model = _model()
        opt = RefAdamWMiniSF(model.parameters(), lr=None, warmup_steps=3, total_steps=100, repair=repair)
        for t in range(48):
            opt.zero_grad()
            (_loss(model, x, y) * (1e4 if 40 <= t else 1)).backward()
            opt.step()
            if t == 39:
                before = {k: float(opt.param_groups[0]["stats"][k]) for k in ("lr_free_d", "lr_free_d_lagged")}
        return before, {k: float(opt.param_groups[0]["stats"][k]) for k in before}, opt.stats()

    before, after, stats = run(True)
    assert int(stats["repairs"]) > 0
    assert after["lr_free_d_lagged"] < 0.6 * before["lr_free_d_lagged"] and after["lr_free_d"] >= before["lr_free_d"]
    before, after, stats = run(False)
    assert int(stats["repairs"]) == 0 and after["lr_free_d_lagged"] >= before["lr_free_d_lagged"]
