"""torch's optimizer conformance checks, applied to ours.

torch's own ``test/test_optim.py`` runs every ``torch.optim`` optimizer through
one harness: an ``OptimizerInfo`` per optimizer (a spread of configurations
and the inputs that must fail) and device-parametrised tests that every
optimizer must pass. This file registers ``RefAdamWMiniSF``, ``AdamWMiniSF``
and the seed front door ``RefAdamWminiScheduleFree`` with that harness and
applies the same kinds of checks (written here for our optimizers):

* the loss goes down, with and without an lr scheduler, on contiguous and
  strided parameters;
* param groups keep their own lr and weight decay, a group at lr 1e-28 stays
  put, and a tensor lr behaves like a float one;
* the per-tensor, multi-tensor and fused paths agree over a run with a 0-dim
  parameter, a layer frozen mid-way and a step without gradients;
* ``state_dict`` round trips (also through ``torch.save`` and
  ``torch.load(weights_only=True)``), deepcopy and pickle continue the run;
* step, ``state_dict`` and ``load_state_dict`` hooks run once and can be
  removed; ``repr`` names the class and the hyperparameters;
* a step without gradients, or with zero gradients, changes nothing.

The harness is torch's private API (``torch.testing._internal``, which needs
``expecttest``). This file was written for torch 2.13; on a torch without
those names the whole module is skipped, saying so.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import ExponentialLR, LinearLR, ReduceLROnPlateau, StepLR
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from refadamw import AdamWMiniSF, RefAdamWMiniSF
from refadamw.precision import LOW_PRECISION, resolve_state_dtype
from refadamwmini_schedulefree import RefAdamWminiScheduleFree

from .test_fused import assert_close_up_to_storage_rounding

WRITTEN_FOR_TORCH = "2.13"

# Importing common_utils calls torch.backends.disable_global_flags(), which forbids setting e.g.
# torch.backends.cudnn.benchmark for the rest of the process; the other test modules share it.
_backend_flags_were_free = not torch.backends.flags_frozen()
try:
    from torch.testing._internal.common_device_type import instantiate_device_type_tests
    from torch.testing._internal.common_optimizers import (ErrorOptimizerInput, OptimizerErrorEnum, OptimizerInfo,
                                                           OptimizerInput, get_error_inputs_for_all_optims, optims)
    from torch.testing._internal.common_utils import TestCase, parametrize
except ImportError as error:  # a torch without these private names, or no expecttest
    if error.name == "expecttest":
        pytest.skip("torch's optimizer test harness needs expecttest (pip install 'expecttest>=0.3.0', "
                    "in the test extra)", allow_module_level=True)
    pytest.skip(f"torch {torch.__version__} lacks the private optimizer test harness this file was written for "
                f"(torch {WRITTEN_FOR_TORCH}'s torch.testing._internal): {error}", allow_module_level=True)
finally:
    if _backend_flags_were_free:
        torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True


# ----------------------------------------------------------------- the OptimizerInfo entries

def _input(desc: str, **kwargs) -> OptimizerInput:
    return OptimizerInput(params=None, kwargs=kwargs, desc=desc)


def _configs(*extra: OptimizerInput):
    """An ``optim_inputs_func``: the product's configurations, then ``extra``.

    Like torch's, these leave ``foreach``/``fused`` unset; :func:`_implementations`
    adds them where a test wants every code path.
    """
    def optim_inputs(device, dtype=None):
        return [
            _input("defaults"),
            _input("non-default lr, no warmup", lr=1e-2, warmup_steps=0),
            _input("weight_decay", weight_decay=0.1),
            _input("fp32 state", state_dtype="fp32"),
            _input("bf16 state", state_dtype="bf16"),
            _input("fp16 state", state_dtype="fp16"),
            _input("per-element second moment", mini=False),
            _input("momentum instead of Schedule-Free", schedule_free=False),
            _input("auto lr", auto_lr=True),
            _input("4 rows per second-moment block", block_rows=4),
            _input("Tensor lr", lr=torch.tensor(1e-2)),
            *extra,
        ]
    return optim_inputs


_REF_ACTIVE = _input("Ref injection on every step", total_steps=20, ref_window=(0.0, 1.0), ref_alpha=0.1)
_SEED_NAMES = _input("the seed's argument names", dtype=torch.float32, ref_max_steps=20, ref_alpha=0.1)


def _param(device="cpu"):
    return Parameter(torch.randn(2, 2, device=device))


def _sparse_grad_param():
    param = _param()
    param.grad = torch.randn(2, 2).to_sparse()
    return param


def _errors(*extra: ErrorOptimizerInput):
    """An ``optim_error_inputs_func``: torch's cases for every optimizer, ours, then ``extra``."""
    def error_inputs(device, dtype):
        errors = []
        for error in get_error_inputs_for_all_optims(device, dtype):
            if issubclass(error.error_type, Warning) and "duplicate" in error.error_regex:
                # torch.optim warns about a parameter listed twice in one group; we refuse it by design
                error = ErrorOptimizerInput(error.optimizer_error_input, error_type=ValueError,
                                            error_regex="duplicate parameters")
            errors.append(error)
        if str(device).startswith("cpu"):
            errors += [
                ErrorOptimizerInput(_input("fused outside the multi-tensor path", fused=True, foreach=False),
                                    error_type=ValueError, error_regex="runs inside the multi-tensor path"),
                ErrorOptimizerInput(_input("negative Tensor lr", lr=torch.tensor(-1e-3)),
                                    error_type=ValueError, error_regex="lr must be >= 0"),
                ErrorOptimizerInput(OptimizerInput(params=[_sparse_grad_param()], kwargs={}, desc="sparse gradient"),
                                    error_on=OptimizerErrorEnum.STEP_ERROR, error_type=TypeError,
                                    error_regex="does not support sparse gradients"),
                *extra,
            ]
        return errors
    return error_inputs


_SCHEDULERS = (
    [lambda opt: StepLR(opt, gamma=0.9, step_size=10), lambda opt: ReduceLROnPlateau(opt)],
    [lambda opt: LinearLR(opt, start_factor=0.4, total_iters=5)],
    [lambda opt: ExponentialLR(opt, gamma=0.95)],
)

# Our ``fused`` runs inside the multi-tensor path rather than instead of it, so torch's helper that
# tries each "cliquey" flag alone (fused=True with foreach=False) does not apply; see _implementations.
_COMMON = dict(scheduler_inputs=_SCHEDULERS, supported_impls=("foreach",), supports_complex=False,
               supports_sparse=False)

optim_db = [
    OptimizerInfo(RefAdamWMiniSF, optim_inputs_func=_configs(_REF_ACTIVE), optim_error_inputs_func=_errors(
        ErrorOptimizerInput(_input("NaN ref_alpha", ref_alpha=float("nan")), error_type=ValueError,
                            error_regex="ref_alpha must not be NaN"),
    ), **_COMMON),
    OptimizerInfo(AdamWMiniSF, optim_inputs_func=_configs(), optim_error_inputs_func=_errors(), **_COMMON),
    OptimizerInfo(RefAdamWminiScheduleFree, optim_inputs_func=_configs(_REF_ACTIVE, _SEED_NAMES),
                  optim_error_inputs_func=_errors(
                      ErrorOptimizerInput(_input("dtype and state_dtype disagree", dtype="fp32", state_dtype="bf16"),
                                          error_type=ValueError, error_regex="disagree"),
                      ErrorOptimizerInput(_input("legacy not a bool", legacy="yes"), error_type=TypeError,
                                          error_regex="legacy"),
                  ), **_COMMON),
]

_IMPLEMENTATIONS = {"per-tensor": dict(foreach=False), "multi-tensor": dict(foreach=True, fused=False),
                    "fused": dict(foreach=True, fused=True)}


def _implementations(optim_info, device):
    """(description, kwargs) for every configuration on every code path."""
    for config in optim_info.optim_inputs_func(device):
        for name, flags in _IMPLEMENTATIONS.items():
            yield f"{config.desc} ({name})", {**config.kwargs, **flags}


def _kwargs(optim_info, device):
    """(description, kwargs) for every configuration, on the default code path."""
    return [(config.desc, config.kwargs) for config in optim_info.optim_inputs_func(device)]


# --------------------------------------------------------------------------- the problem

def _leaves(tensors) -> list[Parameter]:
    """New leaf parameters with the values and the strides of ``tensors`` (a strided one stays strided)."""
    leaves = []
    for t in tensors:
        leaf = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
        leaves.append(Parameter(leaf.copy_(t.detach())))
    return leaves


class _Problem:
    """Parameters and a loss: a 64x64 weight (one Adam-mini block per row), a bias, a 0-dim scale
    and a small head, with one input per step."""

    FROZEN = 3  # the head's weight, which tests freeze mid-way

    def __init__(self, device, dtype, *, contiguous=True, seed=0, inputs=7):
        gen = torch.Generator().manual_seed(seed)

        def draw(*shape):
            return torch.randn(*shape, generator=gen, dtype=dtype).to(device)

        weight = draw(64, 64) if contiguous else draw(64, 64, 2)[..., 0]
        self.initial = [weight, draw(64), torch.tensor(1.5, dtype=dtype, device=device), draw(4, 64) / 8, draw(4)]
        self.inputs = draw(inputs, 64) / 8
        self.params = self.fresh()

    def fresh(self) -> list[Parameter]:
        """New leaf parameters holding the initial values."""
        return _leaves(self.initial)

    def loss(self, params, step: int = 0) -> torch.Tensor:
        weight, bias, scale, head, head_bias = params
        hidden = torch.tanh(weight.mv(self.inputs[step % len(self.inputs)]) + bias) * scale
        return (head.mv(hidden) + head_bias).pow(2).sum() + (weight.mv(self.inputs[0]) + bias).pow(2).mean()


def _make(optim_info, params, kwargs):
    return optim_info.optim_cls(params, **copy.deepcopy(kwargs))  # a Tensor lr is not shared between runs


def _trained(optim_info, kwargs, device, dtype, steps=0, *, contiguous=True, inputs=7, **training):
    """A fresh problem and an optimizer for it, trained for ``steps`` steps."""
    problem = _Problem(device, dtype, contiguous=contiguous, inputs=inputs)
    opt = _make(optim_info, problem.params, kwargs)
    _train(opt, problem, problem.params, steps, **training)
    return problem, opt


def _train(opt, problem, params, steps, *, start=0, schedulers=(), freeze_at=None, no_grad_at=None):
    for step in range(start, start + steps):
        if step == freeze_at:
            params[problem.FROZEN].requires_grad_(False)
        opt.zero_grad()  # set_to_none: a frozen parameter has no gradient from here on
        if step == no_grad_at:
            opt.step()
            continue
        loss = problem.loss(params, step)
        loss.backward()
        opt.step()
        for scheduler in schedulers:
            scheduler.step(loss.item()) if isinstance(scheduler, ReduceLROnPlateau) else scheduler.step()


def _values(params):
    return [p.detach().clone() for p in params]


def _without_flags(state_dict):
    """A state_dict without the groups' code-path flags, which differ between the paths compared."""
    groups = [{k: v for k, v in g.items() if k not in ("foreach", "fused")} for g in state_dict["param_groups"]]
    return {**state_dict, "param_groups": groups}


EXACT = dict(atol=0, rtol=0)


class TestConformance(TestCase):

    def assert_same_params(self, a, b, **tolerance):
        for p, q in zip(a, b, strict=True):
            self.assertEqual(p, q, **tolerance)

    def assert_same_optimizer(self, a, b, **tolerance):
        """Whole state_dicts: every state tensor, group statistics, controller state (keys not named)."""
        self.assertEqual(_without_flags(a.state_dict()), _without_flags(b.state_dict()), **tolerance)

    def assert_moved(self, params, initial):
        self.assertTrue(any(not torch.equal(p, q) for p, q in zip(params, initial, strict=True)))

    # ------------------------------------------------------------------ construction errors

    @optims(optim_db)
    def test_errors(self, device, dtype, optim_info):
        for error in optim_info.optim_error_inputs_func(device, dtype):
            given = error.optimizer_error_input
            params = [_param(device)] if given.params is None else given.params
            with self.subTest(given.desc):
                if error.error_on == OptimizerErrorEnum.STEP_ERROR:
                    opt = optim_info.optim_cls(params, **given.kwargs)
                    with self.assertRaisesRegex(error.error_type, error.error_regex):
                        opt.step()
                elif issubclass(error.error_type, Warning):
                    with self.assertWarnsRegex(error.error_type, error.error_regex):
                        optim_info.optim_cls(params, **given.kwargs)
                else:
                    with self.assertRaisesRegex(error.error_type, error.error_regex):
                        optim_info.optim_cls(params, **given.kwargs)

    # ------------------------------------------------------------------------- direction

    @parametrize("contiguous", [True, False])
    @parametrize("with_lrsched", [True, False])
    @optims(optim_db)
    def test_goes_right_direction(self, device, dtype, optim_info, contiguous, with_lrsched):
        # Every code path without a scheduler; with one, the default path under each scheduler set.
        runs = [(desc, kwargs, schedulers) for desc, kwargs in _kwargs(optim_info, device)
                for schedulers in optim_info.scheduler_inputs] if with_lrsched else [
            (desc, kwargs, []) for desc, kwargs in _implementations(optim_info, device)]
        for desc, kwargs, schedulers in runs:
            with self.subTest(desc, schedulers=len(schedulers)):
                problem, opt = _trained(optim_info, kwargs, device, dtype, contiguous=contiguous, inputs=1)
                self.assertEqual(problem.params[0].is_contiguous(), contiguous)
                initial = problem.loss(problem.params).item()
                _train(opt, problem, problem.params, 10, schedulers=[make(opt) for make in schedulers])
                self.assertLess(problem.loss(problem.params).item(), initial)

    # ---------------------------------------------------------------------- param groups

    def _two_groups(self, optim_info, kwargs, device, dtype, second_group, steps):
        """Two independent problems in two groups, trained on the sum of their losses."""
        first, second = _Problem(device, dtype, seed=1), _Problem(device, dtype, seed=2)
        opt = _make(optim_info, [{"params": first.params}, {"params": second.params, **second_group}], kwargs)
        initial = [first.loss(first.params).item(), second.loss(second.params).item()]
        for step in range(steps):
            opt.zero_grad()
            (first.loss(first.params, step) + second.loss(second.params, step)).backward()
            opt.step()
        final = [first.loss(first.params).item(), second.loss(second.params).item()]
        return first, second, initial, final, opt

    @optims(optim_db)
    def test_param_groups_use_their_own_lr_and_weight_decay(self, device, dtype, optim_info):
        for desc, kwargs in _kwargs(optim_info, device):
            with self.subTest(desc):
                first_plain, second_plain, *_ = self._two_groups(optim_info, kwargs, device, dtype, {}, 6)
                first, second, initial, final, opt = self._two_groups(
                    optim_info, kwargs, device, dtype, {"lr": 3e-2, "weight_decay": 0.5}, 6)
                self.assertEqual([(g["lr"], g["weight_decay"]) for g in opt.param_groups][1], (3e-2, 0.5))
                # the first group's run does not depend on the second group's settings; the second's does
                self.assert_same_params(first.params, first_plain.params, **EXACT)
                self.assert_moved(second.params, second_plain.params)
                for before, after in zip(initial, final):
                    self.assertLess(after, before)

    @optims(optim_db)
    def test_a_group_at_tiny_lr_stays_put_while_another_moves(self, device, dtype, optim_info):
        for desc, kwargs in _implementations(optim_info, device):
            with self.subTest(desc):
                still, moving, *_ = self._two_groups(optim_info, {**kwargs, "lr": 1e-28}, device, dtype,
                                                     {"lr": 1e-2}, 5)
                self.assert_same_params(still.params, still.initial, **EXACT)
                self.assert_moved(moving.params, moving.initial)

    @optims(optim_db)
    def test_tensor_lr_matches_float_lr(self, device, dtype, optim_info):
        for desc, kwargs in _implementations(optim_info, device):
            if isinstance(kwargs.get("lr"), torch.Tensor):
                continue
            with self.subTest(desc):
                runs = []
                for lr in (1e-2, torch.tensor(1e-2)):
                    problem, opt = _trained(optim_info, {**kwargs, "lr": lr}, device, dtype)
                    _train(opt, problem, problem.params, 4, schedulers=[StepLR(opt, step_size=2, gamma=0.5)])
                    runs.append((problem.params, opt))
                (float_params, float_opt), (tensor_params, tensor_opt) = runs
                self.assertIsInstance(tensor_opt.param_groups[0]["lr"], torch.Tensor)
                self.assert_same_params(tensor_params, float_params)
                self.assertEqual(tensor_opt.state_dict()["state"], float_opt.state_dict()["state"])

    # ------------------------------------------------------------------------ code paths

    @optims(optim_db)
    def test_foreach_and_fused_match_per_tensor(self, device, dtype, optim_info):
        for desc, kwargs in _kwargs(optim_info, device):
            runs = {}
            for name, flags in _IMPLEMENTATIONS.items():
                problem, opt = _trained(optim_info, {**kwargs, **flags}, device, dtype, 7, freeze_at=3, no_grad_at=5)
                runs[name] = problem.params, opt
            reference_params, reference = runs.pop("per-tensor")
            rounded = resolve_state_dtype(kwargs.get("state_dtype", "auto"), dtype) in LOW_PRECISION
            for name, (params, opt) in runs.items():
                with self.subTest(desc, path=name):
                    if name == "fused" and rounded:  # the CPU kernel rounds where torch fuses (test_fused.py)
                        for p, q in zip(params, reference_params, strict=True):
                            assert_close_up_to_storage_rounding(p, q)
                    else:
                        self.assert_same_params(params, reference_params)
                    self.assert_same_optimizer(opt, reference)

    # ------------------------------------------------------------------------ state_dict

    @optims(optim_db)
    def test_state_dict_round_trip_continues_identically(self, device, dtype, optim_info):
        def in_memory(state_dict):
            return copy.deepcopy(state_dict)

        def through_a_file(state_dict):
            buffer = io.BytesIO()
            torch.save(state_dict, buffer)
            buffer.seek(0)
            return torch.load(buffer, weights_only=True)

        for desc, kwargs in _kwargs(optim_info, device):
            for transport in (in_memory, through_a_file):
                with self.subTest(desc, transport=transport.__name__):
                    problem, opt = _trained(optim_info, kwargs, device, dtype, 3)
                    params = _leaves(problem.params)
                    resumed = _make(optim_info, params, kwargs)
                    given = transport(opt.state_dict())
                    pristine = copy.deepcopy(given)
                    resumed.load_state_dict(given)
                    self.assertEqual(given, pristine, **EXACT, msg="load_state_dict changed its argument")
                    self.assert_same_optimizer(resumed, opt, **EXACT)
                    _train(opt, problem, problem.params, 3, start=3)
                    _train(resumed, problem, params, 3, start=3)
                    self.assert_same_params(params, problem.params, **EXACT)
                    self.assert_same_optimizer(resumed, opt, **EXACT)
                    self.assertEqual(given, pristine, **EXACT, msg="the optimizer writes into the loaded state_dict")

    @optims(optim_db)
    def test_deepcopy_and_pickle_continue_identically(self, device, dtype, optim_info):
        def public(opt):
            return {k for k in vars(opt) if not k.startswith("_")}

        copiers = {"deepcopy": copy.deepcopy, "pickle": lambda opt: pickle.loads(pickle.dumps(opt))}
        for desc, kwargs in _kwargs(optim_info, device):
            for how, copier in copiers.items():
                with self.subTest(desc, copy=how):
                    problem, opt = _trained(optim_info, kwargs, device, dtype, 3)
                    clone = copier(opt)
                    self.assertIs(type(clone), type(opt))
                    self.assert_same_optimizer(clone, opt, **EXACT)
                    params = [p for g in clone.param_groups for p in g["params"]]
                    _train(opt, problem, problem.params, 3, start=3)
                    _train(clone, problem, params, 3, start=3)
                    self.assert_same_params(params, problem.params, **EXACT)
                    self.assert_same_optimizer(clone, opt, **EXACT)
                    self.assertEqual(public(clone), public(opt))

    # ----------------------------------------------------------------------------- hooks

    @optims(optim_db)
    def test_step_hooks_run_once_and_are_removable(self, device, dtype, optim_info):
        problem, opt = _trained(optim_info, {}, device, dtype)
        calls = []

        def hook(name):
            return lambda optimizer, args, kwargs: calls.append((name, optimizer is opt))

        handles = [
            register_optimizer_step_pre_hook(hook("global pre")),
            opt.register_step_pre_hook(hook("pre")),
            opt.register_step_post_hook(hook("post")),
            register_optimizer_step_post_hook(hook("global post")),
        ]
        for handle in handles:
            self.addCleanup(handle.remove)  # global hooks would outlive a failing test
        _train(opt, problem, problem.params, 2)
        self.assertEqual(calls, [("global pre", True), ("pre", True), ("post", True), ("global post", True)] * 2)
        for handle in handles:
            handle.remove()
        _train(opt, problem, problem.params, 1, start=2)
        self.assertEqual(len(calls), 8)

    @optims(optim_db)
    def test_state_dict_hooks_run_once_and_are_removable(self, device, dtype, optim_info):
        _, opt = _trained(optim_info, {}, device, dtype, 2)
        calls, seen = [], []
        handles = [
            opt.register_state_dict_pre_hook(lambda optimizer: calls.append("pre")),
            opt.register_state_dict_post_hook(lambda optimizer, state_dict: seen.append(sorted(state_dict))),
            opt.register_state_dict_post_hook(lambda optimizer, state_dict: {**state_dict, "hooked": True}),
        ]
        state_dict = opt.state_dict()
        self.assertEqual(calls, ["pre"])
        self.assertTrue(state_dict["hooked"])
        self.assertEqual(seen, [sorted(k for k in state_dict if k != "hooked")],
                         msg="a post hook must see the whole state_dict")
        for handle in handles:
            handle.remove()
        self.assertNotIn("hooked", opt.state_dict())
        self.assertEqual((calls, len(seen)), (["pre"], 1))

    @optims(optim_db)
    def test_load_state_dict_hooks_run_once_and_are_removable(self, device, dtype, optim_info):
        problem, opt = _trained(optim_info, {}, device, dtype, 2)
        saved = opt.state_dict()
        resumed = _make(optim_info, problem.fresh(), {})
        calls = []

        def pre_hook(optimizer, state_dict):
            calls.append("pre")
            groups = [{**g, "lr": 5e-4} for g in state_dict["param_groups"]]
            return {**state_dict, "param_groups": groups}  # what the optimizer loads instead

        def post_hook(optimizer):
            calls.append(("post", optimizer.param_groups[0]["lr"]))

        handles = [resumed.register_load_state_dict_pre_hook(pre_hook),
                   resumed.register_load_state_dict_post_hook(post_hook)]
        resumed.load_state_dict(saved)
        self.assertEqual(calls, ["pre", ("post", 5e-4)])
        for handle in handles:
            handle.remove()
        resumed.load_state_dict(saved)
        self.assertEqual(len(calls), 2)
        self.assertEqual(resumed.param_groups[0]["lr"], opt.param_groups[0]["lr"])

    # ------------------------------------------------------------------------------ repr

    @optims(optim_db)
    def test_repr_names_the_class_and_hyperparameters(self, device, dtype, optim_info):
        for desc, kwargs in _kwargs(optim_info, device):
            with self.subTest(desc):
                _, opt = _trained(optim_info, kwargs, device, dtype, 1)  # statistics tensors in the groups by now
                text = repr(opt)
                self.assertIn(optim_info.optim_cls.__name__, text)
                for key in opt.defaults:
                    self.assertIn(f"{key}: ", text)

    # ---------------------------------------------------------------------------- no-ops

    @optims(optim_db)
    def test_step_without_gradients_changes_nothing(self, device, dtype, optim_info):
        for desc, kwargs in _implementations(optim_info, device):
            with self.subTest(desc):
                problem, opt = _trained(optim_info, kwargs, device, dtype)
                opt.step()
                self.assert_same_params(problem.params, problem.initial, **EXACT)
                self.assertFalse(any(opt.state.values()), msg="state created without a gradient")
                _train(opt, problem, problem.params, 2)
                params, state_dict = _values(problem.params), copy.deepcopy(opt.state_dict())
                opt.zero_grad()
                opt.step()
                self.assert_same_params(problem.params, params, **EXACT)
                self.assertEqual(opt.state_dict(), state_dict, **EXACT)

    @optims(optim_db)
    def test_zero_gradients_leave_the_weights_unchanged(self, device, dtype, optim_info):
        # The training point y after each step, and the average x after eval(): both stay the start.
        for desc, kwargs in _implementations(optim_info, device):
            with self.subTest(desc):
                problem, opt = _trained(optim_info, {**kwargs, "weight_decay": 0.0}, device, dtype)
                for step in range(3):
                    for p in problem.params:
                        p.grad = torch.zeros_like(p)
                    opt.step()
                    self.assert_same_params(problem.params, problem.initial, **EXACT, msg=f"after step {step}")
                opt.eval()
                self.assert_same_params(problem.params, problem.initial, **EXACT, msg="after eval()")


instantiate_device_type_tests(TestConformance, globals(), only_for=("cpu", "cuda"))
