"""The fused backward pass (refadamw.back_pass): each parameter stepped inside backward.

The reference is the ordinary path, ``step()`` over whole groups: the per-parameter steps must give the
same parameters and states bit for bit wherever no decision needs the whole step's gradients (no
controller, or a controller outside its window with no spike). What does need them (the controller's
lagged decision, the spike guard, non-finite gradients, clipping) is tested against what the
design says it does (docs/fused_backward.md).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refadamw import AdamWMiniSF, RefAdamWMiniSF, back_pass, fused_backward
from refadamw.controller import MIN_SHARE, RefController


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
                                torch.nn.Linear(32, 3))
    return model.to(dtype)


def _batches(n, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g).to(dtype), torch.randn(16, 3, generator=g).to(dtype)) for _ in range(n)]


def _loss(model, batch, scale=1.0):
    x, y = batch
    return ((model(x) - y) ** 2).mean() * scale


def _train(make, batches, fused, *, loop="helper", scales=None, **kwargs):
    model = _model(kwargs.pop("dtype", torch.float32))
    opt = make(model, fused)
    if fused and loop == "helper":
        fused_backward(model, opt, **kwargs)
    if fused and loop in ("kohya", "onetrainer"):
        for group in opt.param_groups:
            for i, p in enumerate(group["params"]):
                def hook(tensor, group=group, i=i):
                    if loop == "kohya":
                        opt.step_param(tensor, group)
                    else:
                        opt.step_parameter(tensor, group, i)
                    tensor.grad = None
                p.register_post_accumulate_grad_hook(hook)
    for t, batch in enumerate(batches):
        _loss(model, batch, 1.0 if scales is None else scales[t]).backward()
        if not (fused and loop == "kohya"):  # kohya's loop never calls step() in this mode
            opt.step()
        opt.zero_grad()
    return model, opt


def _assert_same(a, b):
    (ma, oa), (mb, ob) = a, b
    for p, q in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(p, q)
        assert oa.state[p].keys() == ob.state[q].keys()
        for key in oa.state[p]:
            assert torch.equal(oa.state[p][key], ob.state[q][key]), key


@settings(max_examples=12, deadline=None)
@given(dtype=st.sampled_from([torch.float32, torch.bfloat16]), state_dtype=st.sampled_from(["fp32", "bf16"]),
       ref=st.booleans(), foreach=st.booleans(), fused=st.sampled_from([None, False]),
       weight_decay=st.sampled_from([0.0, 0.1]), loop=st.sampled_from(["helper", "kohya", "onetrainer"]),
       averaging_power=st.sampled_from([0.0, 1.0]))
def test_per_parameter_steps_equal_the_whole_step(dtype, state_dtype, ref, foreach, fused, weight_decay, loop,
                                                  averaging_power):
    cls = RefAdamWMiniSF if ref else AdamWMiniSF

    def make(model, fused_back_pass):
        return cls(model.parameters(), lr=1e-2, warmup_steps=3, weight_decay=weight_decay, state_dtype=state_dtype,
                   foreach=foreach, fused=fused, fused_back_pass=fused_back_pass, averaging_power=averaging_power)

    batches = _batches(8, dtype)
    whole = _train(make, batches, False, dtype=dtype)
    per_parameter = _train(make, batches, True, loop=loop, dtype=dtype)
    _assert_same(whole, per_parameter)
    sa, sb = whole[1].stats(), per_parameter[1].stats()
    assert sa["steps"].item() == sb["steps"].item() == 8 and sb["skipped_steps"].item() == 0
    torch.testing.assert_close(sa["effective_lr"], sb["effective_lr"])


def test_groups_frozen_parameters_and_auto_lr():
    def make(model, fused_back_pass):
        model[0].bias.requires_grad_(False)
        return AdamWMiniSF([{"params": list(model[0].parameters()) + list(model[2].parameters()), "lr": 3e-3},
                            {"params": model[4].parameters(), "weight_decay": 0.1}], auto_lr=True,
                           fused_back_pass=fused_back_pass)

    batches = _batches(6)
    whole, per_parameter = _train(make, batches, False), _train(make, batches, True)
    _assert_same(whole, per_parameter)
    for ga, gb in zip(whole[1].param_groups, per_parameter[1].param_groups):
        assert ga["stats"]["steps"].item() == gb["stats"]["steps"].item() == 6
        torch.testing.assert_close(ga["stats"]["lr"], gb["stats"]["lr"])


def test_resume_mid_run_is_bit_exact_with_the_controller_deciding():
    """The decision a backward applies comes from the step before; it is in the controller's state."""
    def make(model, fused_back_pass):
        return RefAdamWMiniSF(model.parameters(), lr=1e-2, total_steps=12, ref_window=(0.0, 1.0),
                              fused_back_pass=fused_back_pass)

    batches = _batches(12)
    straight = _train(make, batches, True)
    model, opt = _train(make, batches[:6], True)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed_model = _model()
    resumed_model.load_state_dict(saved["model"])
    resumed = make(resumed_model, True)
    resumed.load_state_dict(saved["opt"])
    fused_backward(resumed_model, resumed)
    for batch in batches[6:]:
        _loss(resumed_model, batch).backward()
        resumed.step()
    _assert_same(straight, (resumed_model, resumed))
    assert straight[1].stats()["lam"].item() == pytest.approx(0.05)  # the window was in force...
    no_injection = _train(lambda m, f: RefAdamWMiniSF(m.parameters(), lr=1e-2, total_steps=12, ref_alpha=0.0,
                                                      fused_back_pass=f), batches, True)
    assert not torch.equal(straight[0][0].weight, no_injection[0][0].weight)  # ...and applied


def test_controller_decisions_apply_one_step_later():
    """λ decided from step t's signals is applied in step t+1's per-parameter updates."""
    opt = RefAdamWMiniSF(_model().parameters(), total_steps=10, ref_window=(0.0, 1.0), fused_back_pass=True)
    assert opt.controller.standing().lam.item() == 0.0
    model = _model()
    opt = RefAdamWMiniSF(model.parameters(), total_steps=10, ref_window=(0.0, 1.0), fused_back_pass=True)
    fused_backward(model, opt)
    _loss(model, _batches(1)[0]).backward()
    opt.step()
    assert opt.controller.standing().lam.item() == pytest.approx(0.05)


def _spiked_run(fused, factor, spike_at=30, steps=31, repair=True):
    def make(model, fused_back_pass):
        return RefAdamWMiniSF(model.parameters(), lr=1e-2, repair=repair, fused_back_pass=fused_back_pass)

    scales = [factor if t == spike_at else 1.0 for t in range(steps)]
    return _train(make, _batches(steps), fused, scales=scales)


@pytest.mark.parametrize("factor", [10.0, 1000.0])
def test_a_spike_is_skipped_from_the_first_tensor_that_shows_it(factor):
    before = _spiked_run(True, 1.0, steps=30)
    spiked = _spiked_run(True, factor)
    skipped = [torch.equal(p, q) for p, q in zip(before[0].parameters(), spiked[0].parameters())]
    # backward reaches the last layer first: its tensors show the spike and are skipped, and so is
    # everything after them
    assert all(skipped[-2:])
    if factor == 1000.0:
        assert all(skipped)
    assert spiked[1].stats()["skipped_steps"].item() == 1
    without_repair = _spiked_run(True, factor, repair=False)
    assert not any(torch.equal(p, q) for p, q in zip(before[0].parameters(), without_repair[0].parameters()))


@pytest.mark.parametrize("one_by_one", [True, False])
def test_a_non_finite_gradient_skips_its_update_and_with_a_controller_the_rest_of_the_backward(one_by_one,
                                                                                               monkeypatch):
    """One by one (tensors over STAGE_NUMEL): the tensor is skipped, and with a controller every tensor
    after it. Small tensors are applied together, so the call that holds it is skipped whole."""
    if one_by_one:
        monkeypatch.setattr(back_pass, "STAGE_NUMEL", 0)
    for cls, rest_skipped in ((AdamWMiniSF, False), (RefAdamWMiniSF, True)):
        model = _model()
        opt = cls(model.parameters(), fused_back_pass=True)
        fused_backward(model, opt)
        for batch in _batches(3):
            _loss(model, batch).backward()
            opt.step()
        before = copy.deepcopy(model)
        last = model[4].weight
        last.register_hook(lambda g: torch.full_like(g, float("nan")))  # runs before the step's hook
        _loss(model, _batches(1, seed=5)[0]).backward()
        opt.step()
        unchanged = [torch.equal(p, q) for p, q in zip(before.parameters(), model.parameters())]
        if one_by_one:
            assert unchanged[4] and not unchanged[5]  # the NaN weight was skipped; its bias (stepped first) was not
            assert all(unchanged[:4]) == rest_skipped
        else:
            assert all(unchanged)
        assert opt.param_groups[0]["stats"]["skipped_steps"].item() == 1
        assert torch.isfinite(opt.state[last]["z_minus_y"].float()).all()


def test_small_tensors_are_applied_together_within_the_budget(monkeypatch):
    """Held gradients are applied at the backward's end, or once FLUSH_NUMEL elements are held."""
    calls = []
    real = AdamWMiniSF._apply
    monkeypatch.setattr(AdamWMiniSF, "_apply", lambda self, group, indices, given: (
        calls.append(len(indices)), real(self, group, indices, given))[1])
    model = _model()
    opt = AdamWMiniSF(model.parameters(), fused_back_pass=True)
    fused_backward(model, opt)
    before = copy.deepcopy(model)
    _loss(model, _batches(1)[0]).backward()
    assert calls == [6]  # applied by the end of backward, before step()
    assert not any(torch.equal(p, q) for p, q in zip(before.parameters(), model.parameters()))
    opt.step()
    monkeypatch.setattr(back_pass, "FLUSH_NUMEL", 32 * 32)
    calls.clear()
    _loss(model, _batches(1)[0]).backward()
    # backward's order: the last layer's bias and weight (3 + 96), the middle one's (32 + 1,024): 1,155 ≥ 1,024
    # held, so these four are applied; the first layer's two at the end
    assert calls == [4, 2]


def test_spike_so_far_tests_the_bound_and_the_projection_against_the_running_norm():
    controller = RefController(0.05, (0.2, 0.8), 100, True)
    for _ in range(30):  # a steady global norm of e with a little noise
        controller.decide(torch.tensor(2.718) * (1 + 0.01 * torch.randn(())))
    zero = torch.zeros(())
    assert not controller.spike_so_far(torch.tensor(1.0), zero)  # a part of a normal step
    assert controller.spike_so_far(torch.tensor(2.718 ** 2 * 4), zero)  # the part alone is 2× the whole: certain
    part = torch.tensor(2.718 ** 2 * MIN_SHARE)  # a normal step's share...
    assert not controller.spike_so_far(part, torch.tensor(MIN_SHARE))
    assert controller.spike_so_far(part * 4, torch.tensor(MIN_SHARE))  # ...doubled, projected to the whole
    assert not controller.spike_so_far(part * 4, torch.tensor(MIN_SHARE / 2))  # too small a share to project
    assert not RefController(0.05, (0.2, 0.8), 100, True).spike_so_far(torch.tensor(1e6), zero)  # warming up
    off = RefController(0.05, (0.2, 0.8), 100, False)
    off.load_state_dict(controller.state_dict())
    assert not off.spike_so_far(torch.tensor(1e6), zero)


class _Recorder:
    """An optimizer that only records the gradients it is asked to step."""

    def __init__(self, params):
        self.param_groups = [{"params": list(params)}]
        self.seen: list[torch.Tensor] = []

    def supports_fused_back_pass(self):
        return True

    def step_parameter(self, p, group, i):
        self.seen.append(p.grad.clone())


def test_clipping_scales_by_the_previous_norm_or_the_norm_seen_so_far():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    opt = _Recorder([a, b])
    fused_backward([a, b], opt, max_grad_norm=1.0)
    ga, gb = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 12.0, 0.0, 0.0])  # norms 5 and 12: global 13
    for _ in range(2):
        ((a * ga).sum() + (b * gb).sum()).backward()
    # first backward, no previous norm: b (reached first) by its own norm 12, a by the 13 seen by then
    first_b, first_a, second_b, second_a = opt.seen
    torch.testing.assert_close(first_b, gb / (12 + 1e-6))
    torch.testing.assert_close(first_a, ga / (13 + 1e-6))
    # then by the previous backward's global norm, 13, as clip_grad_norm_ would
    torch.testing.assert_close(second_b, gb / (13 + 1e-6))
    torch.testing.assert_close(second_a, ga / (13 + 1e-6))
    assert a.grad is None and b.grad is None  # freed once stepped


def test_what_cannot_work_is_refused():
    model = _model()
    plain = AdamWMiniSF(model.parameters())
    _loss(model, _batches(1)[0]).backward()
    with pytest.raises(RuntimeError, match="fused_back_pass=True"):
        plain.step_parameter(model[0].weight, plain.param_groups[0], 0)
    with pytest.raises(ValueError, match="fused_back_pass=True"):
        fused_backward(model, plain)
    with pytest.raises(TypeError, match="no fused backward pass"):
        fused_backward(model, torch.optim.AdamW(model.parameters()))
    opt = AdamWMiniSF(model.parameters(), fused_back_pass=True)
    with pytest.raises(RuntimeError, match="no step_parameter\\(\\) call applied"):
        opt.step()  # gradients exist, but nothing stepped them: the hooks are missing
    model.zero_grad()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step(lambda: 0.0)
    with pytest.raises(ValueError, match="not in the model"):
        fused_backward(model[0], opt)
    with pytest.raises(ValueError, match="max_grad_norm"):
        fused_backward(model, opt, max_grad_norm=0.0)
    with pytest.raises(TypeError, match="fused_back_pass"):
        AdamWMiniSF(model.parameters(), fused_back_pass=1)
    fused_backward(model, opt)
    batches = _batches(3)
    _loss(model, batches[0]).backward()
    opt.step()
    _loss(model, batches[1]).backward()
    with pytest.raises(RuntimeError, match="gradient accumulation"):
        _loss(model, batches[2]).backward()  # a second backward before step(): accumulation
    with pytest.raises(ValueError, match="not in this optimizer"):
        opt.step_parameter(torch.nn.Parameter(torch.zeros(2)).requires_grad_().__setattr__("grad", None) or
                           _with_grad(), opt.param_groups[0])


def _with_grad():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.zeros(2)
    return p


def test_step_is_a_no_op_and_stats_land_in_a_loop_without_step():
    model = _model()
    opt = RefAdamWMiniSF(model.parameters(), fused_back_pass=True)
    assert opt.supports_fused_back_pass()
    fused_backward(model, opt)
    _loss(model, _batches(1)[0]).backward()
    weights = copy.deepcopy(list(model.parameters()))
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(weights, model.parameters()))
    assert opt.stats()["steps"].item() == 1
    # kohya never calls step(): a step ends when the next backward begins, or at stats(), state_dict() or eval()
    model = _model()
    opt = RefAdamWMiniSF(model.parameters(), fused_back_pass=True)
    fused_backward(model, opt)
    for batch in _batches(2):
        _loss(model, batch).backward()
    assert opt.param_groups[0]["stats"]["steps"].item() == 1
    assert opt.state_dict()["param_groups"][0]["stats"]["steps"].item() == 2
    assert opt.controller.stats()["controller_steps"].item() == 2
    _loss(model, _batches(1)[0]).backward()
    assert opt.stats()["steps"].item() == 3


def test_a_lasting_divergence_leaves_a_standing_pull_for_the_next_backward():
    controller = RefController(0.05, (0.2, 0.8), 100, True)
    for _ in range(30):
        controller.decide(torch.tensor(2.718) * (1 + 0.01 * torch.randn(())))
    assert controller.standing().pull.item() == 0.0
    for _ in range(5):  # pull_after (4) flagged steps in a row
        controller.decide(torch.tensor(2.718e4))
    assert controller.standing().pull.item() > 0.0
    restored = RefController(0.05, (0.2, 0.8), 100, True)
    restored.load_state_dict(controller.state_dict())
    assert restored.standing().pull.item() == controller.standing().pull.item()


def test_the_hooks_drive_prodigy_plus_schedule_free_too():
    """fused_backward() needs only supports_fused_back_pass() and step_parameter(): the bench's peer."""
    prodigyplus = pytest.importorskip("prodigyplus.prodigy_plus_schedulefree")
    model = _model()
    opt = prodigyplus.ProdigyPlusScheduleFree(model.parameters(), fused_back_pass=True)
    fused_backward(model, opt)
    before = copy.deepcopy(model)
    for batch in _batches(3):
        _loss(model, batch).backward()
        opt.step()
    assert all(p.grad is None for p in model.parameters())
    assert not any(torch.equal(p, q) for p, q in zip(before.parameters(), model.parameters()))
