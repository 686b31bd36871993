"""Property tests (hypothesis): random shapes (0-dim to 4-D), parameter dtypes (fp64, fp32,
bf16, fp16), state dtypes, kernel paths and hyperparameters within their valid ranges.

* the step matches the float64 reference of SPEC.md (tests/spec_reference.py) within the
  tolerance the storage dtypes allow;
* finite input never produces a non-finite parameter or state value, including with the Ref
  controller, across the train/eval switch;
* a run is deterministic: the same seed gives bit-identical parameters and state.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refadamw import AdamWMiniSF, RefAdamWMiniSF, partition
from refadamw.precision import resolve_state_dtype

from . import spec_reference
from .spec_reference import SpecHyper, SpecParam, spec_step
from .test_optimizer_reference import STATE_ROUNDING, PathLength, _options, assert_displacement_close

PARAM_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
STATE_DTYPES = ["auto", "fp32", "bf16", "fp16"]
STEPS = 4

_spec_hyper = st.builds(
    SpecHyper,
    lr=st.floats(0.0, 0.1), beta1=st.floats(0.05, 0.99), beta2=st.floats(0.0, 0.9999),
    eps=st.sampled_from([1e-10, 1e-8, 1e-4]), weight_decay=st.floats(0.0, 0.3),
    warmup_steps=st.integers(0, 5), auto_lr=st.booleans(),
    min_lr=st.one_of(st.none(), st.floats(0.0, 1e-3)), max_lr=st.one_of(st.none(), st.floats(1e-3, 0.2)),
    alpha=st.floats(0.01, 1.0), mini=st.booleans(), block_rows=st.sampled_from([1, 2]),
    schedule_free=st.booleans(), averaging_power=st.sampled_from([0.0, 1.0, 2.0]),
)
_shape = st.lists(st.sampled_from([0, 1, 2, 4, 6]), min_size=0, max_size=4).map(tuple)
_settings = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _block_rows_fit(shapes, block_rows):
    """block_rows must divide dim 0 of every blocked tensor."""
    return [s if len(s) < 2 or s[0] % block_rows == 0 else (block_rows * s[0],) + s[1:] for s in shapes]


STORAGE_ROUNDING = {torch.float64: 2.0**-40, torch.float32: 2.0**-16, torch.bfloat16: STATE_ROUNDING["bf16"],
                    torch.float16: STATE_ROUNDING["fp16"]}
"""Error bound relative to the update, per storage dtype of the state (see ``STATE_ROUNDING``);
fp32/fp64 state leaves only the arithmetic's own rounding."""


@_settings
@given(hp=_spec_hyper, shapes=st.lists(_shape, min_size=1, max_size=4), param_dtype=st.sampled_from(PARAM_DTYPES),
       state_dtype=st.sampled_from(STATE_DTYPES), foreach=st.booleans(), fused=st.booleans(),
       seed=st.integers(0, 2**16))
def test_random_configs_match_the_float64_reference(hp, shapes, param_dtype, state_dtype, foreach, fused, seed):
    _check_against_reference(hp, shapes, param_dtype, state_dtype, foreach, fused, seed)


@pytest.mark.parametrize("param_dtype,state_dtype", [(torch.float32, "bf16"), (torch.bfloat16, "bf16"),
                                                     (torch.float16, "fp16"), (torch.float32, "fp32")])
def test_the_reference_comparison_rejects_an_optimizer_that_never_moves(param_dtype, state_dtype):
    hp = SpecHyper(lr=0.05, weight_decay=0.1, warmup_steps=1)
    with mock.patch.object(AdamWMiniSF, "step", lambda self, closure=None: None):
        with pytest.raises(AssertionError, match="displacement differs"):
            _check_against_reference(hp, [(6, 4), (4,), ()], param_dtype, state_dtype, True, True, seed=3)


def _check_against_reference(hp, shapes, param_dtype, state_dtype, foreach, fused, seed):
    shapes = _block_rows_fit(shapes, hp.block_rows)
    if param_dtype == torch.float64:
        state_dtype = "auto"  # fp64 state; lower state precision is covered with fp32 parameters
    gen = torch.Generator().manual_seed(seed)
    values = [torch.randn(s, generator=gen, dtype=torch.float64).to(param_dtype) for s in shapes]
    # Lower the "small tensor" threshold on both sides so tiny tensors take the mini path too.
    with mock.patch.object(partition, "SMALL_NUMEL", 4), mock.patch.object(spec_reference, "SMALL_NUMEL", 4):
        params = [torch.nn.Parameter(v.clone()) for v in values]
        spec = [SpecParam(y=v.to(torch.float64)) for v in values]
        path = PathLength([sp.y for sp in spec])
        opt = AdamWMiniSF(params, foreach=foreach, fused=fused and foreach, state_dtype=state_dtype, **_options(hp))
        for step in range(STEPS):
            grads = [(torch.randn(s, generator=gen, dtype=torch.float64) * (1 + 9 * (step == 2))).to(param_dtype)
                     for s in shapes]
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            spec_step(spec, [g.to(torch.float64) for g in grads], hp)
            scales = path.scales([sp.y for sp in spec])
    rel = STORAGE_ROUNDING[resolve_state_dtype(state_dtype, param_dtype)]
    assert_displacement_close(params, [sp.y for sp in spec], [v.to(torch.float64) for v in values], scales,
                              rel=rel, steps=STEPS, what="after 4 steps")


_magnitude = st.sampled_from([0.0, 1e-30, 1e-12, 1e-4, 1.0, 1e4])


def _finite_grad(shape, dtype, magnitude, gen) -> torch.Tensor:
    """A finite gradient of about ``magnitude``, clamped into ``dtype``'s range."""
    g = torch.randn(shape, generator=gen, dtype=torch.float64) * magnitude
    big = torch.finfo(dtype).max / 4
    return g.clamp(-big, big).to(dtype)


def _run(shapes, param_dtype, options, magnitudes, seed, controller):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(param_dtype)) for s in shapes]
    if controller:
        opt = RefAdamWMiniSF(params, total_steps=len(magnitudes), **options)
    else:
        opt = AdamWMiniSF(params, **options)
    for step, magnitude in enumerate(magnitudes):
        for p in params:
            p.grad = _finite_grad(p.shape, param_dtype, magnitude, gen)
        if controller:
            opt.step(loss=float(1.0 + magnitude))
        else:
            opt.step()
    return params, opt


_options_strategy = st.fixed_dictionaries({
    "lr": st.sampled_from([1e-5, 1e-3, 3e-2]),
    "weight_decay": st.sampled_from([0.0, 0.1]),
    "auto_lr": st.booleans(),
    "mini": st.booleans(),
    "schedule_free": st.booleans(),
    "state_dtype": st.sampled_from(STATE_DTYPES),
    "foreach": st.booleans(),
    "warmup_steps": st.integers(0, 3),
    "eps": st.sampled_from([1e-8, 1e-6]),
})


@_settings
@given(shapes=st.lists(_shape, min_size=1, max_size=3), param_dtype=st.sampled_from(PARAM_DTYPES),
       options=_options_strategy, magnitudes=st.lists(_magnitude, min_size=1, max_size=6), controller=st.booleans(),
       seed=st.integers(0, 2**16))
def test_finite_input_gives_finite_parameters_and_state(shapes, param_dtype, options, magnitudes, controller, seed):
    params, opt = _run(shapes, param_dtype, options, magnitudes, seed, controller)
    tensors = list(params) + [v for s in opt.state.values() for v in s.values() if v.is_floating_point()]
    opt.eval()
    tensors += [p.detach().clone() for p in params]
    opt.train()
    tensors += list(params)
    assert all(t.isfinite().all() for t in tensors)
    assert all(t.isfinite().all() for t in opt.stats().values())


def _snapshot(params, opt):
    return [p.detach().clone() for p in params], {
        i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params) if p in opt.state}


@_settings
@given(shapes=st.lists(_shape, min_size=1, max_size=3), param_dtype=st.sampled_from(PARAM_DTYPES),
       options=_options_strategy, magnitudes=st.lists(_magnitude.filter(bool), min_size=1, max_size=5),
       controller=st.booleans(), seed=st.integers(0, 2**16))
def test_a_run_is_deterministic_for_a_given_seed(shapes, param_dtype, options, magnitudes, controller, seed):
    first = _snapshot(*_run(shapes, param_dtype, options, magnitudes, seed, controller))
    second = _snapshot(*_run(shapes, param_dtype, options, magnitudes, seed, controller))
    assert all(torch.equal(a, b) for a, b in zip(first[0], second[0]))
    assert first[1].keys() == second[1].keys()
    for i, state in first[1].items():
        assert all(torch.equal(v, second[1][i][k]) for k, v in state.items())
