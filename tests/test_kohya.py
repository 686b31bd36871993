"""The kohya sd-scripts loading path, driven the way its trainer drives an optimizer.

Mirrors library/train_util.py (get_optimizer, get_optimizer_train_eval_fn,
is_schedulefree_optimizer, get_dummy_scheduler) and the train_network.py loop:

1. each ``--optimizer_args key=value`` is split on "=" and parsed with ``ast.literal_eval``;
2. a name whose lowercase ends in "schedulefree" first runs ``import schedulefree`` (an
   ImportError "No schedulefree" without it) and takes a class from it only for the exact names
   RAdamScheduleFree, AdamWScheduleFree and SGDScheduleFree; any other name, such a name included,
   is ``importlib`` + ``getattr``, built as ``Class(params, lr=lr, **kwargs)``;
3. ``optimizer.train()`` is called if the optimizer has it;
4. only for a "...schedulefree" name are ``train``/``eval`` used around sampling and saving,
   and the lr scheduler is a dummy; otherwise they are no-ops and the scheduler is a constant LambdaLR;
5. a save (weights, plus ``optimizer.state_dict()`` for ``--save_state``) happens between
   ``eval_fn()`` and ``train_fn()``; a resume loads both into a freshly built optimizer,
   then ``train_fn()`` runs before the loop.
"""

from __future__ import annotations

import ast
import importlib
import io

import pytest
import torch

from refadamw.precision import parse_state_dtype

COMPAT = "refadamwmini_schedulefree.RefAdamWminiScheduleFree"
PRODUCT = "refadamw.RefAdamWMiniSF"
RECOMMENDED = "refadamw.RefAdamWMiniScheduleFree"  # the same class under a name kohya switches
STEPS, SAVE_EVERY, LR = 12, 4, 1e-2


def get_optimizer(optimizer_type: str, optimizer_args: list[str], params):
    kwargs = {}
    for arg in optimizer_args:
        key, value = arg.split("=")
        kwargs[key] = ast.literal_eval(value)
    if optimizer_type.lower().endswith("schedulefree"):
        pytest.importorskip("schedulefree")  # sd-scripts imports it here and fails without it
    module_name, _, class_name = optimizer_type.rpartition(".")
    optimizer_class = getattr(importlib.import_module(module_name), class_name)
    optimizer = optimizer_class(params, lr=LR, **kwargs)
    if hasattr(optimizer, "train") and callable(optimizer.train):
        optimizer.train()
    return optimizer


def get_train_eval_fns(optimizer, optimizer_type: str):
    if not optimizer_type.lower().endswith("schedulefree"):
        return (lambda: None), (lambda: None)
    return optimizer.train, optimizer.eval  # AttributeError here is the original's crash


def get_scheduler(optimizer, optimizer_type: str):
    if optimizer_type.lower().endswith("schedulefree"):
        class DummyScheduler:
            def step(self):
                pass
        return DummyScheduler()
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # kohya's default "constant"


def _network():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


def _batch(step):
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(16, 8, generator=gen)
    return x, torch.sin(x[:, :4])


def _snapshot(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def train(optimizer_type, optimizer_args, *, save=True, resume_at=None):
    """Run the kohya sequence; returns the saves (with the pre-save parameters) and the final y."""
    network = _network()
    optimizer = get_optimizer(optimizer_type, optimizer_args, network.parameters())
    train_fn, eval_fn = get_train_eval_fns(optimizer, optimizer_type)
    scheduler = get_scheduler(optimizer, optimizer_type)
    eval_fn()  # --sample_at_first
    train_fn()
    train_fn()  # before the loop
    saves = []
    for step in range(1, STEPS + 1):
        x, target = _batch(step)
        loss = torch.nn.functional.mse_loss(network(x), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if save and step % SAVE_EVERY == 0:
            before = _snapshot(network.state_dict())
            eval_fn()
            saves.append({"step": step, "y": before, "weights": _snapshot(network.state_dict()),
                          "state": _snapshot(optimizer.state_dict())})
            train_fn()
            if step == resume_at:  # a new process: fresh network and optimizer, then --resume
                network = _network()
                optimizer = get_optimizer(optimizer_type, optimizer_args, network.parameters())
                train_fn, eval_fn = get_train_eval_fns(optimizer, optimizer_type)
                scheduler = get_scheduler(optimizer, optimizer_type)
                network.load_state_dict(saves[-1]["weights"])
                optimizer.load_state_dict(saves[-1]["state"])
                train_fn()
    final_y = _snapshot(network.state_dict())
    eval_fn()
    return saves, final_y, _snapshot(network.state_dict()), optimizer


def _stepped(optimizer):
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    optimizer.step()
    return optimizer


def _averaged(y, optimizer, network_keys):
    """x = (y − (1−β1)·z)/β1 (SPEC §3 item 4) from the parameters y and the stored δ = z − y."""
    beta1 = optimizer.param_groups[0]["betas"][0]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return {k: (y[k] - (1 - beta1) * (y[k] + optimizer.state[p]["z_minus_y"].float())) / beta1
            for k, p in zip(network_keys, params)}


def _close(a, b, tol=1e-6):
    return all(torch.allclose(a[k], b[k], rtol=tol, atol=tol) for k in a)


ARGS = {
    COMPAT: ['dtype="bfloat16"', "ref_max_steps=12", "weight_decay=0.01"],
    PRODUCT: ['state_dtype="bf16"', "total_steps=12", "weight_decay=0.01"],
    RECOMMENDED: ['state_dtype="bf16"', "total_steps=12", "weight_decay=0.01"],
}
RECIPE = ["state_dtype='bf16'", "total_steps=12"]  # docs/migrating.md: product keywords through the compat name


@pytest.mark.parametrize("optimizer_type, args", [(COMPAT, ARGS[COMPAT]), (PRODUCT, ARGS[PRODUCT]), (COMPAT, RECIPE)])
def test_string_dtypes_parse_through_literal_eval(optimizer_type, args):
    optimizer = get_optimizer(optimizer_type, args, _network().parameters())
    assert parse_state_dtype(optimizer.defaults["state_dtype"]) == torch.bfloat16
    assert all(s["z_minus_y"].dtype == torch.bfloat16 for s in _stepped(optimizer).state.values())
    assert optimizer.total_steps == 12


def test_compat_name_resumes_after_the_save_swap():
    _, straight_y, straight_x, _ = train(COMPAT, ARGS[COMPAT], save=False)
    saves, swapped_y, swapped_x, _ = train(COMPAT, ARGS[COMPAT])
    _, resumed_y, resumed_x, _ = train(COMPAT, ARGS[COMPAT], resume_at=8)
    # The y → x → y round trip costs at most fp32 rounding; training continues on the same path.
    assert _close(swapped_y, straight_y, 1e-5) and _close(swapped_x, straight_x, 1e-5)
    assert _close(resumed_y, straight_y, 1e-5) and _close(resumed_x, straight_x, 1e-5)
    assert not _close(saves[0]["y"], straight_y, 1e-3)  # it did train after the first save


@pytest.mark.parametrize("optimizer_type", [COMPAT, RECOMMENDED])
def test_schedulefree_names_save_the_averaged_weights(optimizer_type):
    saves, final_y, final_saved, optimizer = train(optimizer_type, ARGS[optimizer_type])
    assert [s["step"] for s in saves] == [4, 8, 12]
    last = saves[-1]
    keys = list(last["y"])
    # At the last save the optimizer state is the final one, so x can be recomputed from y and z.
    expected_x = _averaged(last["y"], optimizer, keys)
    assert _close(last["weights"], expected_x)
    assert not _close(last["weights"], last["y"], tol=1e-4)  # x, not y
    assert _close(final_saved, expected_x)
    assert all(g["train_mode"] is False for g in last["state"]["param_groups"])  # saved in eval mode


def test_recommended_name_is_the_product_optimizer():
    import refadamw

    assert refadamw.RefAdamWMiniScheduleFree is refadamw.RefAdamWMiniSF
    assert refadamw.AdamWMiniScheduleFree is refadamw.AdamWMiniSF
    assert RECOMMENDED.lower().endswith("schedulefree") and not PRODUCT.lower().endswith("schedulefree")


def test_recommended_name_resumes_after_the_save_swap():
    _, straight_y, straight_x, _ = train(RECOMMENDED, ARGS[RECOMMENDED], save=False)
    _, resumed_y, resumed_x, _ = train(RECOMMENDED, ARGS[RECOMMENDED], resume_at=8)
    assert _close(resumed_y, straight_y, 1e-5) and _close(resumed_x, straight_x, 1e-5)


def test_legacy_through_kohya_does_not_crash_and_saves_the_parameters():
    args = ["legacy=True", 'dtype="bfloat16"', "ref_max_steps=12"]
    saves, final_y, final_saved, optimizer = train(COMPAT, args)
    assert type(optimizer).__name__ == "LegacyRefAdamWminiScheduleFree"
    assert _close(saves[-1]["weights"], saves[-1]["y"], 0.0)  # no average to swap in
    assert _close(final_y, final_saved, 0.0)
    assert "legacy_controller" in saves[-1]["state"]


def test_the_original_would_crash_here():
    class Original(torch.optim.Optimizer):  # no train()/eval(), like the seed
        def step(self, closure=None):
            pass

    optimizer = Original(_network().parameters(), {"lr": LR})
    with pytest.raises(AttributeError, match="train"):
        get_train_eval_fns(optimizer, "seed.RefAdamWminiScheduleFree")


@pytest.mark.parametrize("page", ["docs/migrating.md", "docs/integrations.md", "README.md"])
def test_the_documented_recipe_is_the_recommended_name_and_loads(page):
    import re
    import shlex
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / page).read_text()
    line = re.search(r"--optimizer_type [^`\n]*", doc).group(0)  # the first kohya command line on the page
    words = shlex.split(line)  # as a shell hands them to sd-scripts' argparse
    optimizer_type = words[words.index("--optimizer_type") + 1]
    args = words[words.index("--optimizer_args") + 1:]
    assert optimizer_type == RECOMMENDED
    optimizer = get_optimizer(optimizer_type, args, _network().parameters())
    assert type(optimizer).__name__ == "RefAdamWMiniSF"
    assert parse_state_dtype(optimizer.defaults["state_dtype"]) == torch.bfloat16 and optimizer.total_steps == 2000
