"""Every invalid argument, gradient and state_dict gets a clear error: the rows of docs/errors.md.

Each table below is one section of docs/errors.md. A row is one thing a user can do wrong, the
exception it raises and an excerpt of the message (a literal piece of it), or, for the few mistakes
that are not errors, what happens instead. The tests are parametrized over the same rows and
``test_docs_match_the_tables`` holds the doc to them: ``python -m tests.test_errors`` prints the
tables to paste.

Two promises are checked on every error, not only the message: nothing changes (a failed
``step()``, ``load_state_dict()`` or ``add_param_group()`` leaves the optimizer as it was, compared
through a deep copy of ``state_dict()``), and the optimizer then steps exactly like an untouched twin.

State is never addressed by name (the per-parameter keys are the kernels' business): the rows pick
"the first parameter-shaped state tensor" and the like out of a real ``state_dict()``.
"""

from __future__ import annotations

import ast
import copy
import io
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from adamwmini_schedulefree import AdamWminiScheduleFree
from refadamw import AdamWMiniSF, RefAdamWMiniSF
from refadamwmini_schedulefree import RefAdamWminiScheduleFree

V, T = ValueError, TypeError
NAN, INF = float("nan"), float("inf")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ON = {
    "all": (AdamWMiniSF, RefAdamWMiniSF, AdamWminiScheduleFree, RefAdamWminiScheduleFree),
    "product": (AdamWMiniSF, RefAdamWMiniSF),
    "ref": (RefAdamWMiniSF, RefAdamWminiScheduleFree),
    "plain": (AdamWMiniSF, AdamWminiScheduleFree),
    "signals": (RefAdamWMiniSF, AdamWminiScheduleFree, RefAdamWminiScheduleFree),  # step(loss=...) exists
    "RefAdamWMiniSF": (RefAdamWMiniSF,),
    "AdamWMiniSF": (AdamWMiniSF,),
}


@dataclass(frozen=True)
class Row:
    id: str  # the pytest id, and the doc's reference to the test
    did: str  # what the user did (Markdown)
    error: type[BaseException] | None  # None: not an error
    says: str  # a literal excerpt of the message; without an error, what happens instead
    case: Any = None  # the input: keyword arguments or a function, per table
    on: str = "all"  # the classes it runs on (ON)
    part: str = ""  # a sub-table of its section in the doc


def _kw(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"`{k}={v!r}`" for k, v in kwargs.items())


def arg(id: str, kwargs: dict[str, Any], error, says: str, on: str = "all", did: str | None = None) -> Row:
    return Row(id, did or _kw(kwargs), error, says, kwargs, on)


# ------------------------------------------------------------------------------------ the model

def _model(device="cpu", dtype=torch.float32, hidden=256):
    torch.manual_seed(0)  # weight (hidden, 16): 4096 elements, so it gets one second-moment value per row
    return torch.nn.Sequential(torch.nn.Linear(16, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 4)).to(
        device, dtype)


def _groups(model):
    """Two groups, weights and biases, as a no-decay setup has."""
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if n.endswith("weight")], "weight_decay": 0.1},
            {"params": [p for n, p in named if n.endswith("bias")]}]


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)


def _build(cls, params, **kwargs):
    extra = {"total_steps": 10} if issubclass(cls, RefAdamWMiniSF) else {}
    return cls(params, fused=False, **extra, **kwargs)  # eager: compiling costs seconds, tested elsewhere


def _trained(cls, device="cpu", steps=2, **kwargs):
    model = _model(device)
    opt = _build(cls, _groups(model), **kwargs)
    for seed in range(steps):
        _grads(model.parameters(), seed)
        opt.step()
    return model, opt


def _assert_same(a: Any, b: Any, where: str = "state_dict") -> None:
    """Equal, tensors by value, dtype, shape and device."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), where
        assert torch.equal(a, b), where
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and set(a) == set(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _continues_like(models, opts, seeds=(11, 12)) -> None:
    """Step every optimizer with the same gradients; the parameters and state_dicts stay equal."""
    for seed in seeds:
        for model, opt in zip(models, opts):
            _grads(model.parameters(), seed)
            opt.step()
    first = list(models[0].parameters())
    for model, opt in zip(models[1:], opts[1:]):
        for p, q in zip(first, model.parameters()):
            assert torch.equal(p, q)
        _assert_same(opts[0].state_dict(), opt.state_dict())


def _raises(row: Row):
    return pytest.raises(row.error, match=re.escape(row.says))


# -------------------------------------------------------------------------- constructor arguments

CONSTRUCTOR = [
    arg("lr-negative", dict(lr=-1e-3), V, "lr must be >= 0.0, got -0.001"),
    arg("lr-str", dict(lr="0.1"), T, "lr must be a real number, got str"),
    arg("lr-bool", dict(lr=True), T, "lr must be a real number, got bool"),
    arg("lr-none-not-free", dict(lr=None, lr_free=False), V, "lr=None asks for the lr-free step size, but lr_free=False"),
    arg("lr_free-str", dict(lr_free="yes"), T, "lr_free must be True or False, got 'yes'"),
    arg("lr_free_scale-zero", dict(lr=None, lr_free_scale=0.0), V, "lr_free_scale must be > 0.0, got 0.0"),
    arg("lr_free_scale-fixed-lr", dict(lr=1e-3, lr_free_scale=2.0), V, "lr_free_scale=2.0 multiplies the lr-free"),
    arg("lr-nan", dict(lr=NAN), V, "lr must not be NaN"),
    arg("lr-inf", dict(lr=INF), V, "lr must be finite"),
    arg("lr-tensor-of-two", dict(lr=torch.tensor([1e-3, 2e-3])), V, "Tensor lr must be 1-element",
        did="`lr=torch.tensor([1e-3, 2e-3])`"),
    arg("betas-one-value", dict(betas=(0.9,)), T, "betas must be a pair (beta1, beta2)"),
    arg("betas-float", dict(betas=0.9), T, "betas must be a pair (beta1, beta2)"),
    arg("beta1-one", dict(betas=(1.0, 0.999)), V, "betas[0] must be < 1.0, got 1.0"),
    arg("beta2-negative", dict(betas=(0.9, -0.1)), V, "betas[1] must be >= 0.0, got -0.1"),
    arg("beta2-above-one", dict(betas=(0.9, 1.5)), V, "betas[1] must be < 1.0, got 1.5"),
    arg("beta1-nan", dict(betas=(NAN, 0.999)), V, "betas[0] must not be NaN"),
    arg("beta1-bool", dict(betas=(True, 0.999)), T, "betas[0] must be a real number, got bool"),
    arg("beta1-zero-schedule-free", dict(betas=(0.0, 0.999)), V, "betas[0] must be > 0 when schedule_free=True"),
    arg("eps-zero", dict(eps=0.0), V, "eps must be > 0.0, got 0.0"),
    arg("eps-negative", dict(eps=-1e-8), V, "eps must be > 0.0, got -1e-08"),
    arg("eps-nan", dict(eps=NAN), V, "eps must not be NaN"),
    arg("eps-inf", dict(eps=INF), V, "eps must be finite"),
    arg("weight_decay-negative", dict(weight_decay=-0.1), V, "weight_decay must be >= 0.0, got -0.1"),
    arg("weight_decay-nan", dict(weight_decay=NAN), V, "weight_decay must not be NaN"),
    arg("weight_decay-inf", dict(weight_decay=INF), V, "weight_decay must be finite"),
    arg("weight_decay-bool", dict(weight_decay=True), T, "weight_decay must be a real number, got bool"),
    arg("averaging_power-negative", dict(averaging_power=-1.0), V, "averaging_power must be >= 0.0, got -1.0"),
    arg("averaging_power-too-large", dict(averaging_power=17.0), V, "averaging_power must be <= 16.0, got 17.0"),
    arg("averaging_power-tensor", dict(averaging_power=torch.tensor(1.0)), T,
        "averaging_power must be a Python number, not a tensor", did="`averaging_power=torch.tensor(1.0)`"),
    arg("warmup_steps-negative", dict(warmup_steps=-1), V, "warmup_steps must be an int >= 0, got -1"),
    arg("warmup_steps-float", dict(warmup_steps=1.5), V, "warmup_steps must be an int >= 0, got 1.5"),
    arg("warmup_steps-bool", dict(warmup_steps=True), V, "warmup_steps must be an int >= 0, got True"),
    arg("warmup_steps-str", dict(warmup_steps="5"), V, "warmup_steps must be an int >= 0, got '5'"),
    arg("auto_lr-int", dict(auto_lr=1), T, "auto_lr must be True or False, got 1"),
    arg("auto_lr-none", dict(auto_lr=None), T, "auto_lr must be True or False, got None"),
    arg("min_lr-negative", dict(min_lr=-1.0), V, "min_lr must be >= 0.0, got -1.0"),
    arg("min_lr-above-max_lr", dict(min_lr=1e-2, max_lr=1e-3), V, "min_lr (0.01) must not exceed max_lr (0.001)"),
    arg("min_lr-nan", dict(min_lr=NAN), V, "min_lr must not be NaN"),
    arg("min_lr-inf", dict(min_lr=INF), V, "min_lr must be finite"),
    arg("max_lr-str", dict(max_lr="1"), T, "max_lr must be a real number, got str"),
    arg("max_lr-negative", dict(max_lr=-1.0), V, "max_lr must be >= 0.0, got -1.0"),
    arg("schedulefree_alpha-zero", dict(schedulefree_alpha=0.0), V, "schedulefree_alpha must be > 0.0, got 0.0"),
    arg("schedulefree_alpha-above-one", dict(schedulefree_alpha=1.5), V, "schedulefree_alpha must be <= 1.0, got 1.5"),
    arg("schedulefree_alpha-none", dict(schedulefree_alpha=None), T, "schedulefree_alpha must be a real number"),
    arg("mini-str", dict(mini="yes"), T, "mini must be True or False, got 'yes'"),
    arg("mini-int", dict(mini=1), T, "mini must be True or False, got 1"),
    arg("schedule_free-int", dict(schedule_free=0), T, "schedule_free must be True or False, got 0"),
    arg("block_rows-zero", dict(block_rows=0), V, "block_rows must be an int >= 1, got 0"),
    arg("block_rows-bool", dict(block_rows=True), V, "block_rows must be an int >= 1, got True"),
    arg("block_rows-float", dict(block_rows=2.0), V, "block_rows must be an int >= 1, got 2.0"),
    arg("block_rows-not-dividing", dict(block_rows=3), V,
        "block_rows=3 does not divide dim 0 of a parameter of shape (256, 16)",
        did="`block_rows=3` with a parameter of 256 rows"),
    arg("state_dtype-unknown", dict(state_dtype="fp8"), V, "state_dtype='fp8' is not a known dtype name"),
    arg("state_dtype-int", dict(state_dtype=3), T, "state_dtype must be a torch.dtype or a string, got int"),
    arg("state_dtype-none", dict(state_dtype=None), T, "state_dtype must be a torch.dtype or a string, got NoneType"),
    arg("state_dtype-float64", dict(state_dtype=torch.float64), V, "state_dtype=torch.float64 is not supported"),
    arg("foreach-str", dict(foreach="no"), T, "foreach must be True or False, got 'no'"),
    arg("fused-int", dict(fused=1), T, "fused must be True or False, got 1"),
    arg("fused-without-foreach", dict(fused=True, foreach=False), V, "it cannot be combined with foreach=False"),
    arg("seed-float", dict(seed=1.0), T, "seed must be an int, got 1.0"),
    arg("seed-bool", dict(seed=True), T, "seed must be an int, got True"),
    arg("unknown-keyword", dict(bogus=1), T, "unexpected keyword argument 'bogus'"),
    arg("ref-argument-without-controller", dict(ref_alpha=0.1), T, "unexpected keyword argument 'ref_alpha'",
        on="plain", did="`ref_alpha=0.1` to `AdamWMiniSF` (no controller)"),
    arg("ref_alpha-negative", dict(ref_alpha=-0.1), V, "ref_alpha must be >= 0.0, got -0.1", on="ref"),
    arg("ref_alpha-above-one", dict(ref_alpha=1.5), V, "ref_alpha must be <= 1.0, got 1.5", on="ref"),
    arg("ref_alpha-nan", dict(ref_alpha=NAN), V, "ref_alpha must not be NaN", on="ref"),
    arg("ref_alpha-bool", dict(ref_alpha=True), T, "ref_alpha must be a real number, got bool", on="ref"),
    arg("ref_window-reversed", dict(ref_window=(0.8, 0.2)), V, "ref_window start must not exceed its end", on="ref"),
    arg("ref_window-above-one", dict(ref_window=(0.2, 1.2)), V, "ref_window[1] must be <= 1.0, got 1.2", on="ref"),
    arg("ref_window-nan", dict(ref_window=(0.2, NAN)), V, "ref_window[1] must not be NaN", on="ref"),
    arg("ref_window-float", dict(ref_window=0.5), T, "ref_window must be", on="ref"),
    arg("ref_window-three", dict(ref_window=(0.1, 0.2, 0.3)), T, "ref_window must be", on="ref"),
    arg("total_steps-zero", dict(total_steps=0), V, "total_steps must be a positive int or None, got 0", on="ref"),
    arg("total_steps-float", dict(total_steps=10.5), V, "total_steps must be a positive int or None, got 10.5",
        on="ref"),
    arg("total_steps-bool", dict(total_steps=True), V, "total_steps must be a positive int or None, got True",
        on="ref"),
    arg("total_steps-str", dict(total_steps="10"), V, "total_steps must be a positive int or None, got '10'",
        on="ref"),
    arg("ref_max_steps-zero", dict(ref_max_steps=0), V, "ref_max_steps must be a positive int or None", on="ref"),
    arg("repair-str", dict(repair="yes"), T, "repair must be True or False, got 'yes'", on="ref"),
    arg("repair-int", dict(repair=1), T, "repair must be True or False, got 1", on="ref"),
]


@pytest.mark.parametrize("row", CONSTRUCTOR, ids=lambda r: r.id)
def test_constructor(row):
    for cls in ON[row.on]:
        with _raises(row):
            cls(_model().parameters(), **row.case)


# ------------------------------------------------------------------------------------ params

def _p(*shape, dtype=torch.float32):
    return torch.nn.Parameter(torch.randn(*shape or (3,)).to(dtype))


def _exhausted():
    params = (p for p in [_p()])
    list(params)
    return params


_SHARED = _p()

PARAMS = [
    Row("none", "`params=None`", T, "params must be an iterable", lambda: None),
    Row("int", "`params=5`", T, "params must be an iterable", lambda: 5),
    Row("a-bare-tensor", "one tensor instead of a list", T, "should be an iterable of Tensors or dicts", _p),
    Row("empty", "`[]`", V, "optimizer got an empty parameter list", lambda: []),
    Row("exhausted-generator", "`model.parameters()` already consumed (a generator used twice)", V,
        "optimizer got an empty parameter list", _exhausted),
    Row("a-set", "a `set` of tensors (its order changes between runs)", T, "ordered collections", lambda: {_p()}),
    Row("one-group-dict", "`{'params': ...}` instead of a list of groups", T, "pass a list of param groups",
        lambda: {"params": [_p()]}),
    Row("group-without-params", "a group dict without `'params'`", V, "needs a 'params' entry",
        lambda: [{"lr": 1e-3}]),
    Row("duplicate", "the same tensor twice", V, "params contains duplicate parameters",
        lambda: [_SHARED, _SHARED]),
    Row("duplicate-named", "the same tensor under two names", V, "params contains duplicate parameters",
        lambda: [("a", _SHARED), ("b", _SHARED)]),
    Row("in-two-groups", "the same tensor in two groups", V, "some parameters appear in more than one parameter group",
        lambda: [{"params": [_SHARED]}, {"params": [_SHARED]}]),
    Row("complex", "a complex parameter", T, "complex parameters are not supported",
        lambda: [_p(dtype=torch.complex64)]),
    Row("integer", "an integer tensor", T, "parameters must be floating point, got a torch.int64 parameter",
        lambda: [torch.zeros(3, dtype=torch.int64)]),
    Row("bool", "a bool tensor", T, "parameters must be floating point, got a torch.bool parameter",
        lambda: [torch.zeros(3, dtype=torch.bool)]),
    Row("not-a-tensor", "a number among the tensors", T, "optimizer can only optimize Tensors",
        lambda: [_p(), 3.0]),
    Row("non-leaf", "a computed tensor (not a leaf)", V, "can't optimize a non-leaf Tensor",
        lambda: [torch.randn(3, requires_grad=True) * 2]),
    Row("names-mixed", "`(name, tensor)` pairs mixed with bare tensors", V,
        "all optimizer params should be with/without names", lambda: [("a", _p()), _p()]),
    Row("group-names-mixed", "one group with names, one without", V,
        "all optimizer param groups should be with/without names",
        lambda: [{"params": [("a", _p())]}, {"params": [_p()]}]),
]


@pytest.mark.parametrize("row", PARAMS, ids=lambda r: r.id)
def test_params(row):
    for cls in ON[row.on]:
        with _raises(row):
            cls(row.case())


# ------------------------------------------------------------------------------- param groups

GROUPS = [
    Row("not-a-dict", "a list instead of a dict", T, "a param group must be a dict, got list", lambda opt: [_p()]),
    Row("without-params", "no `'params'` entry", V, "needs a 'params' entry", lambda opt: {"lr": 1e-3}),
    Row("a-set", "`'params'` a set", T, "ordered collections", lambda opt: {"params": {_p()}}),
    Row("lr-negative", "`'lr': -1.0`", V, "lr must be >= 0.0", lambda opt: {"params": [_p()], "lr": -1.0}),
    Row("lr-nan", "`'lr': nan`", V, "lr must not be NaN", lambda opt: {"params": [_p()], "lr": NAN}),
    Row("betas-float", "`'betas': 0.9`", T, "betas must be a pair", lambda opt: {"params": [_p()], "betas": 0.9}),
    Row("state_dtype-unknown", "`'state_dtype': 'fp8'`", V, "is not a known dtype name",
        lambda opt: {"params": [_p()], "state_dtype": "fp8"}),
    Row("block_rows-not-dividing", "`'block_rows': 2` with a 65-row parameter", V, "does not divide dim 0",
        lambda opt: {"params": [_p(65, 64)], "block_rows": 2}),
    Row("complex", "a complex parameter", T, "complex parameters are not supported",
        lambda opt: {"params": [_p(dtype=torch.complex64)]}),
    Row("integer", "an integer tensor", T, "parameters must be floating point",
        lambda opt: {"params": [torch.zeros(3, dtype=torch.int64)]}),
    Row("already-in-a-group", "a parameter the optimizer already has", V,
        "some parameters appear in more than one parameter group",
        lambda opt: {"params": opt.param_groups[0]["params"][:1]}),
    Row("duplicate", "the same tensor twice", V, "params contains duplicate parameters",
        lambda opt: {"params": [_SHARED, _SHARED]}),
    Row("names-mixed", "named parameters into an optimizer built without names", V,
        "all optimizer param groups should be with/without names", lambda opt: {"params": [("a", _p())]}),
]


@pytest.mark.parametrize("row", GROUPS, ids=lambda r: r.id)
def test_add_param_group(row):
    """A rejected group is not added: the optimizer is as it was."""
    for cls in ON[row.on]:
        opt = cls([_p(4, 3)])
        before = copy.deepcopy(opt.state_dict())
        with _raises(row):
            opt.add_param_group(row.case(opt))
        _assert_same(before, opt.state_dict())


# ------------------------------------------------------------------------------ step / observe

def _closure_returning_a_vector(opt, model):
    def closure():
        return model(torch.randn(4, 16)).sum(0)  # a loss per output, not summed

    opt.step(closure)


def call(id: str, method: str, kwargs: dict[str, Any], error, says: str, on: str = "signals",
         did: str | None = None) -> Row:
    """A row that calls ``opt.<method>(**kwargs)``."""
    plain = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return Row(id, did or f"`{method}({plain})`", error, says, (method, kwargs), on)


STEP = [
    call("loss-str", "step", dict(loss="1.0"), T, "loss must be a Python float or a 0-dim tensor, got str"),
    call("loss-bool", "step", dict(loss=True), T, "loss must be a Python float or a 0-dim tensor, got bool"),
    call("loss-vector", "step", dict(loss=torch.ones(2)), V,
         "loss must be a Python float or a 0-dim tensor, got shape (2,)", did="`step(loss=per_sample_losses)`"),
    call("loss-complex", "step", dict(loss=torch.tensor(1 + 1j, dtype=torch.complex64)), T,
         "got a torch.complex64 tensor", did="`step(loss=complex_tensor)`"),
    call("val_loss-str", "step", dict(val_loss="x"), T, "val_loss must be a Python float or a 0-dim tensor, got str"),
    call("val_loss-list", "step", dict(val_loss=[1.0]), T,
         "val_loss must be a Python float or a 0-dim tensor, got list"),
    call("val_loss-matrix", "step", dict(val_loss=torch.ones(2, 2)), V,
         "val_loss must be a Python float or a 0-dim tensor, got shape (2, 2)", did="`step(val_loss=torch.ones(2, 2))`"),
    call("max_steps-zero", "step", dict(max_steps=0), V, "max_steps must be a positive int or None, got 0"),
    call("max_steps-float", "step", dict(max_steps=1.5), V, "max_steps must be a positive int or None, got 1.5"),
    call("max_steps-bool", "step", dict(max_steps=True), V, "max_steps must be a positive int or None, got True"),
    call("max_steps-tensor", "step", dict(max_steps=torch.tensor(10)), V,
         "max_steps must be a positive int or None, got tensor(10)", did="`step(max_steps=torch.tensor(10))`"),
    call("loss-without-controller", "step", dict(loss=1.0), T, "unexpected keyword argument 'loss'", "AdamWMiniSF",
         did="`step(loss=...)` on `AdamWMiniSF`"),
    call("closure-not-callable", "step", dict(closure=5), T, "'int' object is not callable", "all", did="`step(5)`"),
    Row("closure-vector-loss", "a closure that returns a loss per output", V, "the closure returned a loss of shape",
        _closure_returning_a_vector, "ref"),
    call("observe-loss-str", "observe", dict(loss="1.0"), T,
         "loss must be a Python float or a 0-dim tensor, got str", "ref"),
    call("observe-val_loss-vector", "observe", dict(val_loss=torch.ones(2)), V,
         "val_loss must be a Python float or a 0-dim tensor, got shape (2,)", "ref",
         did="`observe(val_loss=torch.ones(2))`"),
    call("observe-max_steps", "observe", dict(max_steps=10), T, "unexpected keyword argument 'max_steps'", "ref"),
]


@pytest.mark.parametrize("row", STEP, ids=lambda r: r.id)
def test_step_arguments(row):
    """Also on a fresh optimizer, whose state a failed step must not have created."""
    for cls in ON[row.on]:
        models = [_model(), _model()]
        opts = [_build(cls, m.parameters()) for m in models]
        _grads(models[0].parameters(), 0)
        before = copy.deepcopy(opts[0].state_dict())
        with _raises(row):
            if callable(row.case):
                row.case(opts[0], models[0])
            else:
                method, kwargs = row.case
                getattr(opts[0], method)(**kwargs)
        _assert_same(before, opts[0].state_dict())
        _continues_like(models, opts)


# ---------------------------------------------------------------------------------- gradients

def _swap_data(p, grad):
    """A gradient of another dtype or shape: torch checks ``p.grad = g``, not ``p.grad.data = g``
    (a dtype alone also passes after ``p.grad_dtype = None``, on a torch that has it)."""
    p.grad = torch.zeros_like(p)
    p.grad.data = grad


GRADS = [  # the bad gradient goes to the second of two parameters, after one with a good gradient
    Row("sparse", "a sparse gradient (`nn.Embedding(sparse=True)`)", T, "does not support sparse gradients",
        lambda p, g: setattr(p, "grad", g.to_sparse())),
    Row("complex", "a complex gradient", T, "complex gradients are not supported",
        lambda p, g: _swap_data(p, g.to(torch.complex64))),
    Row("integer", "an integer gradient", T, "gradients must be floating point",
        lambda p, g: _swap_data(p, g.round().long())),
    Row("other-shape", "a gradient of another shape", V,
        "but the parameter has shape (6, 4)", lambda p, g: _swap_data(p, torch.randn(5, 4))),
    Row("broadcastable-shape", "a gradient of shape `(1, 4)` for a `(6, 4)` parameter", V,
        "but the parameter has shape (6, 4)", lambda p, g: _swap_data(p, g[:1].clone())),
    Row("flattened", "a flattened gradient", V, "but the parameter has shape (6, 4)",
        lambda p, g: _swap_data(p, g.flatten())),
    Row("other-device", "a gradient on another device", RuntimeError, "on the same device",
        lambda p, g: setattr(p, "grad", torch.empty(p.shape, device="meta"))),
    Row("float64", "an fp64 gradient for an fp32 parameter", None,
        "the step uses it in the compute dtype (fp32), as `grad.float()`",
        lambda p, g: _swap_data(p, g.double()) or g),
    Row("bfloat16", "a bf16 gradient for an fp32 parameter", None,
        "the step uses it in the compute dtype (fp32), as `grad.float()`",
        lambda p, g: _swap_data(p, g.bfloat16()) or g.bfloat16().float()),
]


@pytest.mark.parametrize("row", GRADS, ids=lambda r: r.id)
def test_gradients(row):
    """A bad gradient fails the whole step before anything changes (no state is created for the
    parameter before it either); a good one of another dtype steps like its fp32 value."""
    for cls in ON["product"]:
        for foreach in (True, False):
            for device in DEVICES:
                models = [torch.nn.ParameterList([_p(8, 4), _p(6, 4)]).to(device) for _ in range(2)]
                models[1].load_state_dict(models[0].state_dict())
                opts = [_build(cls, m.parameters(), foreach=foreach) for m in models]
                for model in models:
                    _grads(model.parameters(), 0)
                bad = models[0][1]
                if row.error is None:  # the twin gets the gradient's value in the parameter's dtype
                    models[1][1].grad = row.case(bad, bad.grad.clone())
                else:
                    before = copy.deepcopy(opts[0].state_dict())
                    with _raises(row):
                        row.case(bad, bad.grad.clone())
                        opts[0].step()
                    _assert_same(before, opts[0].state_dict())
                    bad.grad = models[1][1].grad = None
                for opt in opts:
                    opt.step()
                _continues_like(models, opts)


# ------------------------------------------------------------------------------- state_dicts

def _first(entry: Mapping[str, Any], test: Callable[[torch.Tensor], bool]) -> str:
    return next(k for k, v in entry.items() if isinstance(v, torch.Tensor) and test(v))


def _param_shaped(sd):
    """The key of the first state tensor shaped like parameter 0 (the (256, 16) weight)."""
    return _first(sd["state"][0], lambda v: tuple(v.shape) == (256, 16))


def _scalar(sd):
    return _first(sd["state"][0], lambda v: v.dim() == 0 and v.is_floating_point())


def _integer(sd):
    # not the step: a float step is how checkpoints from before int64 counters hold it, and loads
    return _first(sd["state"][0], lambda v: v.dtype == torch.int32)


def _walk(sd, path):
    """The container of the last key of ``path`` in sd, and that key (a callable key is resolved on sd)."""
    *parents, last = [k(sd) if callable(k) else k for k in path]
    node = sd
    for key in parents:
        node = node[key]
    return node, last


def _set(path: tuple, value: Callable[[Any, dict], Any]):
    """A mutation: sd[path...] becomes value(old value or None, sd)."""
    def mutate(sd, opt, model):
        node, last = _walk(sd, path)
        node[last] = value(node.get(last) if isinstance(node, Mapping) else node[last], sd)
        return sd
    return mutate


def _delete(*path):
    def mutate(sd, opt, model):
        node, last = _walk(sd, path)
        del node[last]
        return sd
    return mutate


def _from(make: Callable[[torch.nn.Module, type], torch.optim.Optimizer], model_factory=None):
    """The state_dict of another optimizer (given the model and the loading class), one step on a copy."""
    def mutate(sd, opt, model):
        other = copy.deepcopy(model) if model_factory is None else model_factory().to(next(model.parameters()).device)
        other_opt = make(other, type(opt))
        _grads(other.parameters(), 0)
        other_opt.step()
        return other_opt.state_dict()
    return mutate


def _regrouped(model):
    params = list(model.parameters())
    return [{"params": params[:1]}, {"params": params[1:]}]


BAD_STATE = [
    # truncated
    Row("missing-state", "no `'state'` key", V, "not an optimizer state_dict: missing ['state']",
        _delete("state"), "product", "truncated"),
    Row("missing-param_groups", "no `'param_groups'` key", V, "not an optimizer state_dict: missing ['param_groups']",
        _delete("param_groups"), "product", "truncated"),
    Row("missing-ref_config", "no `'ref_config'` (RefAdamWMiniSF)", V, "lacks ['ref_config']",
        _delete("ref_config"), "RefAdamWMiniSF", "truncated"),
    Row("missing-ref_controller", "no `'ref_controller'` (RefAdamWMiniSF)", V, "lacks ['ref_controller']",
        _delete("ref_controller"), "RefAdamWMiniSF", "truncated"),
    Row("fewer-groups", "fewer param groups than the optimizer has", V,
        "the state_dict has 1 param groups, this optimizer has 2",
        _set(("param_groups",), lambda old, sd: old[:1]), "product", "truncated"),
    Row("fewer-params", "a group lists fewer parameters", V, "param group 0 has 2 parameters, the state_dict's has 1",
        _set(("param_groups", 0, "params"), lambda old, sd: old[:1]), "product", "truncated"),
    Row("group-lacks-a-hyperparameter", "a group without `'lr'`", V, "lacks ['lr']",
        _delete("param_groups", 0, "lr"), "product", "truncated"),
    Row("group-lacks-stats", "a group without `'stats'`", V, "lacks ['stats']",
        _delete("param_groups", 0, "stats"), "product", "truncated"),
    Row("state-lacks-a-key", "a parameter's state without one of its tensors", V, "state of parameter 0 has keys",
        _delete("state", 0, _scalar), "product", "truncated"),
    Row("controller-lacks-a-key", "the controller state without one of its tensors", V,
        "RefController state: missing keys",
        _delete("ref_controller", lambda sd: next(iter(sd["ref_controller"]))), "RefAdamWMiniSF", "truncated"),
    # corrupted
    Row("not-a-mapping", "a list instead of a state_dict", T, "state_dict must be a mapping, got list",
        lambda sd, opt, model: [1, 2], "product", "corrupted"),
    Row("param_groups-not-a-list", "`'param_groups'` a dict", T,
        "state_dict['param_groups'] must be a list and state_dict['state'] a mapping",
        _set(("param_groups",), lambda old, sd: {0: old[0]}), "product", "corrupted"),
    Row("state-not-a-mapping", "`'state'` a list", T,
        "state_dict['param_groups'] must be a list and state_dict['state'] a mapping",
        _set(("state",), lambda old, sd: list(old.values())), "product", "corrupted"),
    Row("group-not-a-dict", "a param group that is not a dict", T, "param group 0 of the state_dict is not a dict",
        _set(("param_groups", 0), lambda old, sd: 5), "product", "corrupted"),
    Row("group-params-not-a-list", "a group's `'params'` not a list", T, "'params' must be a list",
        _set(("param_groups", 0, "params"), lambda old, sd: 5), "product", "corrupted"),
    Row("state-entry-not-a-dict", "a parameter's state not a dict", T, "state of parameter 0 is not a dict",
        _set(("state", 0), lambda old, sd: 5), "product", "corrupted"),
    Row("state-value-a-number", "a state tensor replaced by a number", T, "of parameter 0 is not a tensor",
        _set(("state", 0, _scalar), lambda old, sd: 3.0), "product", "corrupted"),
    Row("state-value-a-list", "a state tensor replaced by a list (`.tolist()`)", T, "of parameter 0 is not a tensor",
        _set(("state", 0, _param_shaped), lambda old, sd: old.tolist()), "product", "corrupted"),
    Row("state-wrong-shape", "a state tensor of another shape", V, "has shape (3, 16), expected (256, 16)",
        _set(("state", 0, _param_shaped), lambda old, sd: old[:3]), "product", "corrupted"),
    Row("scalar-state-wrong-shape", "a scalar state of shape `(1,)`", V, "has shape (1,), expected ()",
        _set(("state", 0, _scalar), lambda old, sd: old.reshape(1)), "product", "corrupted"),
    Row("state-integer-dtype", "a state tensor cast to int64", T, "has dtype torch.int64, expected",
        _set(("state", 0, _param_shaped), lambda old, sd: old.long()), "product", "corrupted"),
    Row("state-complex-dtype", "a state tensor cast to complex64", T, "has dtype torch.complex64, expected",
        _set(("state", 0, _param_shaped), lambda old, sd: old.to(torch.complex64)), "product", "corrupted"),
    Row("integer-state-float-dtype", "an integer state (the rounding key) cast to float", T,
        "has dtype torch.float32, expected", _set(("state", 0, _integer), lambda old, sd: old.float()),
        "product", "corrupted"),
    Row("scalar-state-nan", "a scalar state (a step counter, a running norm) that is NaN", V,
        "scalar state must be finite", _set(("state", 0, _scalar), lambda old, sd: torch.full_like(old, NAN)),
        "product", "corrupted"),
    Row("unlisted-state", "state for a parameter id no group lists", V, "that no param group lists",
        _set(("state", 99), lambda old, sd: copy.deepcopy(sd["state"][0])), "product", "corrupted"),
    Row("lr-nan", "`'lr': nan` in a group", V, "lr must not be NaN",
        _set(("param_groups", 0, "lr"), lambda old, sd: NAN), "product", "corrupted"),
    Row("lr-negative", "`'lr': -1.0` in a group", V, "lr must be >= 0.0",
        _set(("param_groups", 0, "lr"), lambda old, sd: -1.0), "product", "corrupted"),
    Row("betas-str", "`'betas': 'ab'` in a group", T, "betas must be a pair",
        _set(("param_groups", 0, "betas"), lambda old, sd: "ab"), "product", "corrupted"),
    Row("schedule_free-int", "`'schedule_free': 1` in a group", T, "schedule_free must be True or False",
        _set(("param_groups", 0, "schedule_free"), lambda old, sd: 1), "product", "corrupted"),
    Row("train_mode-str", "`'train_mode': 'yes'` in a group", T, "train_mode must be True or False",
        _set(("param_groups", 0, "train_mode"), lambda old, sd: "yes"), "product", "corrupted"),
    Row("stats-a-number", "a group's `'stats'` entry a number", V, "has malformed 'stats'",
        _set(("param_groups", 0, "stats", "steps"), lambda old, sd: 3), "product", "corrupted"),
    Row("stats-wrong-shape", "a group's `'stats'` entry of two values", V, "has malformed 'stats'",
        _set(("param_groups", 0, "stats", "steps"), lambda old, sd: torch.zeros(2)), "product", "corrupted"),
    Row("ref_config-none", "`'ref_config': None`", V, "the state_dict's 'ref_config' is malformed",
        _set(("ref_config",), lambda old, sd: None), "RefAdamWMiniSF", "corrupted"),
    Row("ref_config-bad-value", "`'ref_config'` with `ref_alpha=2.0`", V, "ref_alpha must be <= 1.0, got 2.0",
        _set(("ref_config", "ref_alpha"), lambda old, sd: 2.0), "RefAdamWMiniSF", "corrupted"),
    Row("controller-wrong-shape", "a controller tensor of another shape", V, "RefController state[",
        _set(("ref_controller", lambda sd: next(iter(sd["ref_controller"]))), lambda old, sd: torch.zeros(3)),
        "RefAdamWMiniSF", "corrupted"),
    Row("controller-not-a-tensor", "a controller tensor replaced by a number", T, "must be a tensor, got float",
        _set(("ref_controller", lambda sd: next(iter(sd["ref_controller"]))), lambda old, sd: 1.0),
        "RefAdamWMiniSF", "corrupted"),
    # mismatched
    Row("from-torch-adamw", "a `torch.optim.AdamW` state_dict", V, "does not come from",
        _from(lambda m, cls: torch.optim.AdamW(_groups(m))), "product", "mismatched"),
    Row("from-AdamWMiniSF", "an `AdamWMiniSF` state_dict into `RefAdamWMiniSF`", V,
        "does not come from RefAdamWMiniSF", _from(lambda m, cls: _build(AdamWMiniSF, _groups(m))),
        "RefAdamWMiniSF", "mismatched"),
    Row("from-RefAdamWMiniSF", "a `RefAdamWMiniSF` state_dict into `AdamWMiniSF`", V,
        "does not come from AdamWMiniSF", _from(lambda m, cls: _build(RefAdamWMiniSF, _groups(m))),
        "AdamWMiniSF", "mismatched"),
    Row("other-grouping", "the same parameters split into other groups", V, "parameters, the state_dict's has",
        _from(lambda m, cls: _build(cls, _regrouped(m))), "product", "mismatched"),
    Row("other-model", "a model with other shapes (same number of parameters)", V, "of parameter 0 has shape",
        _from(lambda m, cls: _build(cls, _groups(m)), lambda: _model(hidden=128)), "product", "mismatched"),
    Row("schedule_free-flipped", "a group's `schedule_free` flipped, its state kept", V,
        "(is the state_dict from another optimizer or schedule_free setting?)",
        _set(("param_groups", 0, "schedule_free"), lambda old, sd: not old), "product", "mismatched"),
    Row("mini-flipped", "a group's `mini` flipped, its state kept", V, "of parameter 0 has shape",
        _set(("param_groups", 0, "mini"), lambda old, sd: not old), "product", "mismatched"),
]


@pytest.mark.parametrize("row", BAD_STATE, ids=lambda r: r.id)
def test_bad_state_dict(row):
    """Refused, and the optimizer is exactly as it was: it then steps like an untouched twin."""
    for cls in ON[row.on]:
        for device in DEVICES:
            (model, opt), (twin, twin_opt) = _trained(cls, device), _trained(cls, device)
            before = copy.deepcopy(opt.state_dict())
            bad = row.case(copy.deepcopy(opt.state_dict()), opt, model)
            with _raises(row):
                opt.load_state_dict(bad)
            _assert_same(before, opt.state_dict())
            _continues_like([model, twin], [opt, twin_opt])


def _without_first_entry(cls):
    model, opt = _trained(cls)
    del opt.state[next(iter(opt.state))]  # as if that parameter never had a gradient
    return model, opt, opt.state_dict()


def _recast(cls):
    model, opt = _trained(cls)
    sd = copy.deepcopy(opt.state_dict())
    key = _param_shaped(sd)
    sd["state"][0][key] = sd["state"][0][key].double()
    return model, opt, sd


def _with(**kwargs):
    def make(cls):
        model, opt = _trained(cls, **kwargs)
        return model, opt, opt.state_dict()
    return make


def _weights_only(cls):
    model, opt = _trained(cls)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return model, opt, torch.load(buffer, weights_only=True)


ACCEPTED_STATE = [
    Row("no-entry-for-a-parameter", "no state for a parameter (it never had a gradient)", None,
        "that parameter starts fresh on its next gradient", _without_first_entry, "product"),
    Row("other-float-dtype", "a state tensor in another floating dtype", None,
        "cast to the dtype its group stores it in", _recast, "product"),
    Row("schedule_free-false", "saved with `schedule_free=False`, loaded into an optimizer built with `True`",
        None, "the saved settings win, like `lr`: the run continues as saved", _with(schedule_free=False), "product"),
    Row("mini-false", "saved with `mini=False`, loaded into an optimizer built with `True`", None,
        "the saved settings win, like `lr`: the run continues as saved", _with(mini=False), "product"),
    Row("state_dtype-fp32", "saved with `state_dtype='fp32'`, loaded into a bf16 one", None,
        "the saved settings win, like `lr`: the run continues as saved", _with(state_dtype="fp32"), "product"),
    Row("weights-only-load", "read back with `torch.load(weights_only=True)`", None, "continues exactly",
        _weights_only, "product"),
]


@pytest.mark.parametrize("row", ACCEPTED_STATE, ids=lambda r: r.id)
def test_accepted_state_dict(row):
    """Not errors: a fresh optimizer (built with the defaults) loads it and continues like the source."""
    for cls in ON[row.on]:
        model, opt, sd = row.case(cls)
        target = copy.deepcopy(model)
        target_opt = _build(cls, _groups(target))
        target_opt.load_state_dict(sd)
        _continues_like([model, target], [opt, target_opt])


# ------------------------------------------------------------- parameters converted after some steps

def _cuda(model):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return model.cuda()


CONVERSIONS = [
    Row("double", "`model.double()` after some steps", None, "continues as after a state_dict save and load",
        (torch.float32, lambda m: m.double())),
    Row("half", "`model.half()` after some steps", None, "continues as after a state_dict save and load",
        (torch.float32, lambda m: m.half())),
    Row("bfloat16", "`model.bfloat16()` after some steps", None, "continues as after a state_dict save and load",
        (torch.float32, lambda m: m.bfloat16())),
    Row("float", "`model.float()` after some steps in bf16", None, "continues as after a state_dict save and load",
        (torch.bfloat16, lambda m: m.float())),
    Row("cuda", "`model.cuda()` after some steps on the CPU", None,
        "continues as after a state_dict save and load (state, statistics and controller move along)",
        (torch.float32, _cuda)),
]


@pytest.mark.parametrize("row", CONVERSIONS, ids=lambda r: r.id)
def test_parameters_converted(row):
    """The optimizer treats converted parameters as a resume into the converted model: the state is
    laid out for the new dtype and device (fp64 parameters get fp64 state and arithmetic) exactly as
    ``load_state_dict`` lays it out, and the run continues bit for bit like that resume."""
    start, convert = row.case
    for cls in ON["product"]:
        model = _model(dtype=start)
        opt = _build(cls, _groups(model))
        for seed in range(2):
            _grads(model.parameters(), seed)
            opt.step()
        convert(model)
        twin = copy.deepcopy(model)
        twin_opt = _build(cls, _groups(twin))
        twin_opt.load_state_dict(opt.state_dict())
        _continues_like([model, twin], [opt, twin_opt])
        for o in (opt, twin_opt):
            o.eval()
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


# ------------------------------------------------------------------------- unsupported setups

def _marked(*shape, **marks):
    """A parameter carrying the attributes FSDP1 or DeepSpeed put on the ones they manage."""
    p = _p(*shape)
    for name, value in marks.items():
        setattr(p, name, value)
    return p


def _construct(*shape, **marks):
    return lambda cls: _build(cls, [_p(4, 3), _marked(*shape, **marks)])


def _added_group(cls):
    _build(cls, [_p(4, 3)]).add_param_group({"params": [_marked(64, 64, _fsdp_flattened=True)]})


def _swapped_in(flat):
    """The group's params replaced behind add_param_group's back, then a step (as accelerate does for an
    optimizer built before FSDP1 wrapping, and ZeRO-1/2 with its flat fp32 partitions)."""
    def run(cls):
        opt = _build(cls, [_p(64, 64)])
        param = flat()
        param.grad = torch.randn_like(param)
        opt.param_groups[0]["params"] = [param]
        opt.step()
        assert opt.state[param]  # a warning only: it stepped
    return run


SETUPS = [
    Row("fsdp1-flat-parameter", "an FSDP1 `FlatParameter` (`use_orig_params=False`)", V,
        "FSDP1 (FullyShardedDataParallel) keeps it in a flat 1-D FlatParameter shard",
        _construct(7235, _fsdp_flattened=True, _is_flat_param=True)),
    Row("fsdp1-orig-params", "an FSDP1 parameter with `use_orig_params=True`", V,
        "Supported: single device, DDP (DistributedDataParallel) and FSDP2", _construct(64, 64, _fsdp_flattened=True)),
    Row("zero3-parameter", "a DeepSpeed ZeRO-3 parameter (`ds_id`)", V, "DeepSpeed ZeRO-3 partitioned it",
        _construct(0, ds_id=3, ds_numel=4096)),
    Row("fsdp1-add-param-group", "`add_param_group()` with an FSDP1 parameter", V,
        "FSDP1 (FullyShardedDataParallel)", _added_group),
    Row("fsdp1-swapped-in", "FSDP1 parameters put into a group after construction (accelerate's remapping)", V,
        "FSDP1 (FullyShardedDataParallel)", _swapped_in(lambda: _marked(7235, _fsdp_flattened=True))),
    Row("zero12-partition", "a group holding one 1-D tensor of ≥ 65536 elements (a ZeRO-1/2 flat partition)", None,
        "steps, and warns: how DeepSpeed ZeRO-1/2 hands an optimizer its flat fp32 partition",
        _swapped_in(lambda: _p(1 << 16))),
]


@pytest.mark.parametrize("row", SETUPS, ids=lambda r: r.id)
def test_unsupported_setups(row):
    """FSDP1 and DeepSpeed ZeRO hand the optimizer flat 1-D shards: refused where marked, warned where guessed."""
    for cls in ON[row.on]:
        if row.error is None:
            with pytest.warns(UserWarning, match=re.escape(row.says.split("warns: ", 1)[1])):
                row.case(cls)
        else:
            with _raises(row):
                row.case(cls)


# ------------------------------------------------------------------------------------ the doc

DOC = Path(__file__).resolve().parent.parent / "docs" / "errors.md"
TABLES = {
    "test_constructor": CONSTRUCTOR, "test_params": PARAMS, "test_add_param_group": GROUPS,
    "test_step_arguments": STEP, "test_gradients": GRADS, "test_bad_state_dict": BAD_STATE,
    "test_accepted_state_dict": ACCEPTED_STATE, "test_parameters_converted": CONVERSIONS,
    "test_unsupported_setups": SETUPS,
}
HEADER = "| What you did | Exception | Message (excerpt) | Test |\n|---|---|---|---|"


def _doc_row(test: str, row: Row) -> str:
    error, says = (f"`{row.error.__name__}`", f"`{row.says}`") if row.error else ("none", row.says)
    return f"| {row.did} | {error} | {says} | `test_errors.py::{test}[{row.id}]` |"


def render() -> str:
    """The doc's tables, one per test (and per part), in order."""
    out = []
    for test, rows in TABLES.items():
        parts = list(dict.fromkeys(r.part for r in rows))
        for part in parts:
            out.append(f"<!-- {test}{' ' + part if part else ''} -->\n{HEADER}")
            out.extend(_doc_row(test, r) for r in rows if r.part == part)
            out.append("")
    return "\n".join(out)


def test_row_ids_are_unique():
    for test, rows in TABLES.items():
        ids = [r.id for r in rows]
        assert len(ids) == len(set(ids)), test


def test_docs_match_the_tables():
    """Every row of the tables is in docs/errors.md, and every row there names a test that exists."""
    lines = DOC.read_text().splitlines()
    rendered = [line for line in render().splitlines() if line.startswith("| ") and "::" in line]
    missing = [line for line in rendered if line not in lines]
    assert not missing, "docs/errors.md lacks these rows (python -m tests.test_errors prints them):\n" + "\n".join(
        missing)
    tests_dir = Path(__file__).resolve().parent
    for line in lines:
        if not line.startswith("| "):
            continue
        cell = line.rstrip(" |").rsplit("|", 1)[-1]
        ref = re.search(r"`(test_\w+\.py)::(\w+)(?:\[[^\]]+\])?`", cell)
        if line.startswith("| What you did") or line.startswith("|---"):
            continue
        assert ref, f"a row of docs/errors.md names no test: {line}"
        if ref.group(1) == "test_errors.py":
            assert line in rendered, f"docs/errors.md has a row the tables do not: {line}"
        else:
            source = tests_dir / ref.group(1)
            names = {n.name for n in ast.walk(ast.parse(source.read_text())) if isinstance(n, ast.FunctionDef)}
            assert ref.group(2) in names, f"{ref.group(1)} has no {ref.group(2)}: {line}"


if __name__ == "__main__":
    print(render())
