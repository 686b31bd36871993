"""The Ref controller as a table: signal → level → action (SPEC.md §3 items 5–6)."""

import io
import logging
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refadamw.controller import _STATE, Decision, RefController, _window_bounds

from .test_no_host_sync import host_syncs_forbidden

ONE = torch.tensor(1.0)


def make(total_steps=100, repair=True, alpha=0.5, window=(0.2, 0.8), **kw):
    return RefController(alpha, window, total_steps, repair, **kw)


def settle(c, n=30, loss=1.0, noise=0.01, seed=0):
    """Feed ``n`` clean, slightly noisy losses (past the warm-up) with a steady grad norm."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        c.observe(loss=loss * (1 + noise * torch.randn((), generator=g)))
        c.decide(ONE)


def levels_of(c, losses):
    out = []
    for x in losses:
        c.observe(loss=x)
        out.append(c.decide(ONE))
    return out


# -- window ------------------------------------------------------------------------------------

def test_window_boundaries_are_exact():
    c = make(total_steps=100, window=(0.2, 0.8))
    lam = {t: c.decide(ONE).lam for t in range(1, 102)}
    assert [t for t, v in lam.items() if v > 0] == list(range(20, 81))
    assert lam[19] == 0 and lam[20] == 0.5 and lam[80] == 0.5 and lam[81] == 0
    assert lam[20].dtype == torch.float32 and lam[20].dim() == 0


@settings(max_examples=300, deadline=None)
@given(total=st.integers(1, 5000), w=st.tuples(st.floats(0, 1), st.floats(0, 1)).map(sorted))
def test_integer_window_bounds_match_the_seeds_float_test(total, w):
    lo, hi = _window_bounds(w[0], w[1], total)
    ts = range(1, total + 2) if total <= 300 else {1, lo - 1, lo, lo + 1, hi - 1, hi, hi + 1, total, total + 1}
    for t in ts:
        if t >= 1:
            assert (lo <= t <= hi) == (w[0] <= t / total <= w[1]), (t, lo, hi)


def test_max_steps_sets_and_overrides_T():
    c = make(total_steps=None, window=(0.3, 0.6))
    lam = [c.decide(ONE, max_steps=7).lam > 0 for _ in range(8)]  # 3/7 .. 4/7 inside
    assert [t for t, on in enumerate(lam, 1) if on] == [3, 4]
    c = make(total_steps=1000)
    assert c.decide(ONE, max_steps=1).lam == 0  # t=1 of T=1 is outside [0.2, 0.8]
    assert c.decide(ONE).lam == 0  # the override sticks: t=2 > T
    assert c.state_dict()["total_steps"] == 1


def test_no_T_means_no_injection_and_one_warning(caplog):
    c = make(total_steps=None)
    with caplog.at_level(logging.WARNING, logger="refadamw"):
        lams = [c.decide(ONE).lam for _ in range(50)]
    assert all(v == 0 for v in lams)
    records = [r for r in caplog.records if r.name == "refadamw"]
    assert len(records) == 1 and "max_steps" in records[0].getMessage()


def test_known_T_never_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="refadamw"):
        c = make(total_steps=10)
        for _ in range(12):
            c.decide(ONE)
    assert not caplog.records


# -- divergence from the loss -------------------------------------------------------------------

def test_loss_levels_against_the_ema():
    c = make(total_steps=100, window=(0.0, 1.0))
    settle(c)
    d = levels_of(c, [1.3, 1.0, 1.7, 1.0, 3.0, 1.0])
    assert [x.level.item() for x in d] == [1, 0, 2, 0, 3, 0]
    # actions: no injection while diverging, skip from level 2, no pull for a passing spike
    assert [x.lam.item() for x in d] == [0, 0.5, 0, 0.5, 0, 0.5]
    assert [x.pull.item() for x in d] == [0] * 6
    assert [x.skip.item() for x in d] == [False, False, True, False, True, False]
    s = c.stats()
    # the two skipped steps leave the clock: 36 decisions, 34 steps counted
    assert (s["repairs"], s["skips"], s["flagged_steps"], s["controller_steps"]) == (0, 2, 3, 34)


def test_the_seeds_actions_with_an_immediate_pull_and_skip_at_level_3():
    c = make(total_steps=100, window=(0.0, 1.0), pull_after=1, skip_level=3)
    settle(c)
    d = levels_of(c, [1.3, 1.0, 1.7, 1.0, 3.0, 1.0])
    assert [round(x.pull.item(), 6) for x in d] == [0.3, 0, 0.5, 0, 1.0, 0]
    assert [x.skip.item() for x in d] == [False, False, False, False, True, False]
    s = c.stats()
    assert (s["repairs"], s["skips"], s["flagged_steps"], s["controller_steps"]) == (3, 1, 3, 35)


def test_only_a_lasting_divergence_pulls():
    c = make(total_steps=100, window=(0.0, 1.0), pull_after=4, reanchor_after=10)
    settle(c)
    d = levels_of(c, [3.0] * 12)
    assert [x.level.item() for x in d] == [3] * 9 + [0] * 3  # reanchored at the 10th
    assert [x.pull.item() for x in d] == [0.0] * 3 + [1.0] * 6 + [0.0] * 3
    assert [x.skip.item() for x in d] == [True] * 9 + [False] * 3


def test_a_rise_within_the_noise_is_not_flagged():
    c = make()
    settle(c, n=200, noise=0.2)  # σ ≈ 0.2: a 1.3 loss is 1.5σ, not a divergence
    assert levels_of(c, [1.3])[0].level == 0
    assert levels_of(c, [3.0])[0].level == 3


def test_no_level_during_warmup():
    c = make(warmup=20)
    settle(c, n=19)
    assert levels_of(c, [10.0])[0].level == 0


def test_a_flagged_loss_does_not_move_the_baseline():
    c = make()
    settle(c)
    before = c.state_dict()
    levels_of(c, [5.0])
    after = c.state_dict()
    for k in ("loss_ema", "loss_var", "loss_count"):
        assert torch.equal(before[k], after[k]), k


def test_a_lasting_shift_is_reanchored():
    c = make(reanchor_after=10)
    settle(c)
    d = levels_of(c, [3.0 + 0.01 * i for i in range(100)])
    flagged = [x.level.item() > 0 for x in d]
    assert flagged[:9] == [True] * 9 and not any(flagged[9:])


def test_losses_between_steps_combine_by_max_and_stale_steps_are_clean():
    c = make()
    settle(c)
    for x in (1.0, 3.0, 1.0):
        c.observe(loss=x)
    assert c.decide(ONE).level == 3
    assert c.decide(ONE).level == 0  # no fresh loss: the stale spike does not count again
    assert c.decide(torch.tensor(1e6)).level == 3  # but the gradient norm always does


def test_a_non_finite_loss_is_ignored():
    c = make()
    settle(c)
    before = c.state_dict()
    d = levels_of(c, [float("nan"), float("inf")])
    assert all(x.level == 0 for x in d)
    assert torch.equal(before["loss_ema"], c.state_dict()["loss_ema"])


def test_negative_losses_use_a_relative_rise():
    c = make()
    settle(c, loss=-2.0)
    assert [x.level.item() for x in levels_of(c, [-2.0, -1.5, 0.5])] == [0, 1, 3]


@pytest.mark.parametrize("kind", ["gaussian", "lognormal"])
def test_a_clean_noisy_loss_is_rarely_flagged(kind):
    g = torch.Generator().manual_seed(1)
    c = make(total_steps=2000)
    for t in range(2000):
        e = 0.1 * torch.randn((), generator=g)
        c.observe(loss=(0.5 + 3 * math.exp(-t / 300)) * (1 + e if kind == "gaussian" else e.exp()))
        c.decide(ONE)
    assert c.stats()["flagged_steps"] < 20  # < 1% of 2000


# -- divergence from the gradient norm (no loss ever fed) ------------------------------------

def test_grad_norm_spike_without_loss():
    g = torch.Generator().manual_seed(0)
    c = make(window=(0.0, 1.0))
    norms = 3.0 * torch.exp(0.2 * torch.randn(40, generator=g))
    for n in norms:
        assert c.decide(n).level == 0
    d = c.decide(norms[-1] * 1000)
    assert (d.level.item(), d.lam.item(), d.pull.item(), d.skip.item()) == (3, 0.0, 0.0, True)
    assert c.decide(norms[-1]).level == 0  # the spike did not enter the baseline


def test_grad_norm_levels_by_z_score():
    c = make(gnorm_min_std=0.1)
    for _ in range(30):
        c.decide(ONE)  # σ = 0, so the floor 0.1 sets the scale
    assert [c.decide(torch.tensor(math.exp(0.1 * z))).level.item() for z in (3, 5, 7, 10)] == [0, 1, 2, 3]


def test_a_non_finite_grad_norm_is_not_informative():
    c = make()
    for _ in range(30):
        c.decide(ONE)
    before = c.state_dict()
    for bad in (float("nan"), float("inf"), 0.0):
        assert c.decide(torch.tensor(bad)).level == 0
    after = c.state_dict()
    for k in ("gnorm_ema", "gnorm_var", "gnorm_count", "gnorm_run"):
        assert torch.equal(before[k], after[k]), k


def test_a_clean_noisy_grad_norm_is_rarely_flagged():
    g = torch.Generator().manual_seed(2)
    c = make(total_steps=2000)
    for t in range(2000):
        c.decide((2 * math.exp(-t / 700) + 0.5) * torch.exp(0.3 * torch.randn((), generator=g)))
    assert c.stats()["flagged_steps"] < 20


def test_a_gradient_spike_is_caught_even_when_the_loss_looks_normal():
    c = make()
    for _ in range(30):
        c.observe(loss=1.0)
        c.decide(ONE)
    c.observe(loss=1.0)
    assert c.decide(torch.tensor(1e6)).level == 3


# -- actions -------------------------------------------------------------------------------------

def test_repair_off_reports_levels_but_never_pulls_or_skips():
    c = make(repair=False, window=(0.0, 1.0))
    settle(c)
    d = levels_of(c, [1.3, 1.7, 3.0])
    assert [x.level.item() for x in d] == [1, 2, 3]
    assert all(x.pull == 0 and not x.skip and x.lam == 0 for x in d)
    s = c.stats()
    assert (s["repairs"], s["skips"], s["flagged_steps"], s["divergence_level"]) == (0, 0, 3, 3)


def test_custom_ladder():
    c = make(ladder=(0.0, 0.1, 0.2, 0.3), pull_after=1)
    settle(c)
    assert [round(x.pull.item(), 6) for x in levels_of(c, [1.3, 1.7, 3.0, 1.0])] == [0.1, 0.2, 0.3, 0.0]


def test_decision_types():
    d = make().decide(ONE)
    assert isinstance(d, Decision)
    assert (d.lam.dtype, d.pull.dtype, d.skip.dtype) == (torch.float32, torch.float32, torch.bool)
    assert all(x.dim() == 0 for x in d)


# -- overfit (the seed's validation rule) --------------------------------------------------------

class SeedOverfit:
    """SPEC.md §2 "Validation history", word for word, with the IndexError read as "not improving"."""

    def __init__(self, total_steps):
        self.history, self.skip, self.counter = [], False, 0
        self.k = min(20, max(10, int(1e-4 * (total_steps or 1000))))

    def improving(self):
        h = self.history
        for i in range(1, self.k + 1):
            if i + 1 > len(h):  # the seed would read h[-i-1] past the start here
                return False
            if not h[-i] < h[-i - 1]:
                return False
        return True

    def step(self, vals):
        for v in vals:
            if not math.isfinite(v):
                continue  # the product's one departure: a NaN/inf val_loss is not stored (the seed stored it)
            self.history = (self.history + [v])[-20:]
        h = self.history
        overfit = len(h) >= 4 and h[-4] < h[-3] < h[-2] < h[-1]
        if self.skip:
            self.counter = self.counter + 1 if self.improving() else 0
            if self.counter >= self.k:
                self.skip, self.counter = False, 0
        if overfit:
            self.skip = True
        return self.skip


# float32 values: the controller keeps its history in float32, and a float64 value below float32's
# range (say −1.9e−126) would compare differently once stored.
values = st.sampled_from([-1.0, 0.0, 0.5, 1.0, 1.5, 2.0, float("nan")]) | st.floats(-10, 10, width=32)
steps = st.lists(st.lists(values, max_size=3), min_size=1, max_size=80)
falling = st.tuples(st.integers(1, 40), st.sampled_from([10.0, 0.0])).map(  # 0.0: all negative
    lambda a: [[a[1] - 0.1 * i] for i in range(a[0])] + [[]] * 25)
rise_then_fall = st.integers(0, 30).map(
    lambda n: [[1.0], [2.0], [3.0], [4.0]] + [[4.0 - 0.1 * i] for i in range(1, n + 1)] + [[]] * 25)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=steps | falling | rise_then_fall, total=st.sampled_from([None, 1000, 150_000, 250_000]))
def test_overfit_rule_matches_the_seed(events, total):
    c, ref = make(total_steps=total, window=(0.0, 1.0)), SeedOverfit(total)
    for vals in events:
        for v in vals:
            c.observe(val_loss=v)
        suspended = ref.step(vals)
        d = c.decide(ONE)
        assert c.stats()["overfit"].item() == float(suspended)
        if suspended:
            assert d.lam == 0


def test_overfit_suspends_then_k_improving_steps_clear_it():
    c = make(total_steps=1000, window=(0.0, 1.0))  # K = 10
    for v in (1.0, 2.0, 3.0, 4.0):
        c.observe(val_loss=v)
    assert c.decide(ONE).lam == 0 and c.stats()["overfit"] == 1
    for i in range(1, 11):  # ten falling values: improving from the tenth on
        c.observe(val_loss=4.0 - 0.1 * i)
        assert c.decide(ONE).lam == 0
    for _ in range(8):  # improving counts once per decide(): 1 so far, 2..9 here, 10 clears
        assert c.decide(ONE).lam == 0
    assert c.decide(ONE).lam == 0.5 and c.stats()["overfit"] == 0


def test_falling_val_losses_never_crash():
    c = make()
    for i in range(30):
        c.observe(val_loss=10.0 - i)
        c.decide(ONE)
    assert c.stats()["overfit"] == 0


# -- state_dict ----------------------------------------------------------------------------------

def drive(c, n, seed):
    """A mixed run: losses with spikes, grad spikes, val losses, a max_steps override."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(n):
        if t % 3:
            c.observe(loss=float(1 + 0.1 * torch.randn((), generator=g)) * (4 if t % 37 == 0 else 1))
        if t % 5 == 0:
            c.observe(val_loss=torch.rand((), generator=g))
        norm = torch.rand((), generator=g) * (1000 if t % 29 == 0 else 1)
        out.append(c.decide(norm, max_steps=150 if t > 40 else None))
    return out


@pytest.mark.parametrize("n", [0, 7, 45, 90])
def test_state_dict_round_trip_continues_identically(n, caplog):
    a = make(total_steps=120)
    drive(a, n, seed=0)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make(total_steps=None)
    b.load_state_dict(torch.load(buf, weights_only=True))
    with caplog.at_level(logging.WARNING, logger="refadamw"):
        da, db = drive(a, 60, seed=1), drive(b, 60, seed=1)
    assert not caplog.records  # b knows T from the checkpoint
    for x, y in zip(da, db):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert set(a.state_dict()) == set(_STATE)


def _bad_states():
    good = make().state_dict()
    yield "not a mapping", [1, 2], TypeError
    yield "missing key", {k: v for k, v in good.items() if k != "t"}, ValueError
    yield "extra key", {**good, "bogus": torch.tensor(0)}, ValueError
    yield "not a tensor", {**good, "loss_ema": 1.0}, TypeError
    yield "wrong dtype", {**good, "t": torch.tensor(3.0)}, ValueError
    yield "wrong shape", {**good, "val_history": torch.zeros(19)}, ValueError
    yield "negative T", {**good, "total_steps": torch.tensor(-5)}, ValueError


@pytest.mark.parametrize("name,state,error", list(_bad_states()), ids=[s[0] for s in _bad_states()])
def test_bad_state_dicts_raise_and_change_nothing(name, state, error):
    c = make()
    drive(c, 30, seed=0)
    before = c.state_dict()
    with pytest.raises(error, match="state"):
        c.load_state_dict(state)
    after = c.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert c.decide(ONE).lam.dtype == torch.float32  # still usable


# -- no host sync --------------------------------------------------------------------------------

def test_observe_and_decide_never_sync(device):
    c = make(total_steps=None, device=device)
    dev = torch.device(device)
    with host_syncs_forbidden():
        for t in range(60):
            c.observe(loss=1.0 + 0.01 * (t % 3))
            c.observe(loss=torch.tensor(1.0, device=dev) * (3 if t == 40 else 1),
                      val_loss=torch.tensor(5.0 - 0.1 * t, device=dev))
            c.observe(val_loss=float(t % 7))
            norm = torch.tensor(float("nan") if t == 10 else 1.0, device=dev)
            c.decide(norm, max_steps=80 if t > 5 else None)
        d = c.decide(torch.tensor(1e3, device=dev))
    assert d.lam.device.type == dev.type
    assert c.stats()["flagged_steps"] == 2  # the loss spike at t = 40 and the final ×1000 gradient norm
    c2 = make(device=device)
    with host_syncs_forbidden():
        for t in range(40):
            c2.decide(torch.tensor(1e4 if t == 30 else 1.0, device=dev))
    assert c2.stats()["skips"] == 1


def test_to_moves_the_state():
    c = make().to("cpu")
    assert isinstance(c, RefController) and c.decide(ONE).lam.device.type == "cpu"


# -- argument checks -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error", [
    (dict(alpha=-0.1), ValueError), (dict(alpha=1.5), ValueError), (dict(alpha="0.5"), TypeError),
    (dict(alpha=float("nan")), ValueError),
    (dict(window=(0.8, 0.2)), ValueError), (dict(window=(0.2,)), TypeError), (dict(window=0.5), TypeError),
    (dict(window=(-0.1, 0.5)), ValueError), (dict(window=(0.2, 1.1)), ValueError),
    (dict(total_steps=0), ValueError), (dict(total_steps=-3), ValueError), (dict(total_steps=10.0), ValueError),
    (dict(total_steps=True), ValueError),
    (dict(repair=1), TypeError), (dict(repair="yes"), TypeError),
    (dict(ladder=(0, 0.6, 0.8)), TypeError), (dict(ladder=(0, 0.9, 0.8, 1.0)), ValueError),
    (dict(ladder=(0, 0.6, 0.8, 1.5)), ValueError),
    (dict(loss_ratios=(1.5, 1.2, 2.0)), ValueError), (dict(loss_ratios=(0.5, 1.2, 2.0)), ValueError),
    (dict(gnorm_z=(3, 5)), TypeError), (dict(noise_k=-1.0), ValueError), (dict(beta=0.0), ValueError),
    (dict(beta=2.0), ValueError), (dict(warmup=0), ValueError), (dict(reanchor_after=1.5), ValueError),
    (dict(pull_after=0), ValueError), (dict(skip_level=0), ValueError), (dict(skip_level=5), ValueError),
    (dict(skip_level=True), ValueError),
])
def test_bad_constructor_args_raise(kwargs, error):
    with pytest.raises(error):
        make(**kwargs)


@pytest.mark.parametrize("call,error", [
    (lambda c: c.observe(loss=torch.ones(2)), ValueError),
    (lambda c: c.observe(val_loss="1.0"), TypeError),
    (lambda c: c.observe(loss=True), TypeError),
    (lambda c: c.decide(torch.ones(3)), ValueError),
    (lambda c: c.decide(ONE, max_steps=0), ValueError),
    (lambda c: c.decide(ONE, max_steps=2.5), ValueError),
])
def test_bad_signals_raise_before_changing_state(call, error):
    c = make()
    before = c.state_dict()
    with pytest.raises(error):
        call(c)
    assert all(torch.equal(v, c.state_dict()[k]) for k, v in before.items())


# -- the unclipped gradient norm ----------------------------------------------------------------

def test_unclipped_norm_undoes_a_power_of_two_scale_learnt_on_unclipped_steps():
    c = make()
    raw, seen = torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0])
    assert c.unclipped_norm(raw, seen) == 5.0  # no scale, no clipping
    s = 2.0 ** 16  # an fp16 loss scale: hooks see S·g, step() sees g
    assert c.unclipped_norm(raw * s, seen) == 5.0 and c.state_dict()["grad_scale_log2"] == 16
    # a clipped step (÷ 50 after unscaling): the ratio is no power of two, the learnt scale is kept
    assert torch.isclose(c.unclipped_norm(raw * s * 10, seen * 10 / 50), torch.tensor(50.0))
    # a gradient enlarged after backward still counts: never less than what step() sees
    assert c.unclipped_norm(raw, seen * 7) == 35.0
    # tensors without a recorded norm (0) contribute what step() sees
    assert c.unclipped_norm(torch.tensor([0.0, 4.0 * s]), torch.tensor([3.0, 4.0])) == 5.0


def test_a_state_dict_without_the_scale_key_still_loads():
    c = make()
    state = c.state_dict()
    del state["grad_scale_log2"]
    c2 = make()
    c2.load_state_dict(state)
    assert c2.state_dict()["grad_scale_log2"] == 0
