"""averaged(), save_averaged / averaged_state_dict, param_groups, and the plain-loop recipe."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from refadamw import AdamWMiniSF, RefAdamWMiniSF, averaged_state_dict, param_groups, save_averaged
from refadamw.checkpoint import unwrap_optimizer

DOCS = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"


def recipe(name: str) -> str:
    """The code block marked ``<!-- recipe: name -->`` in docs/integrations.md."""
    match = re.search(rf"<!-- recipe: {re.escape(name)} -->\n```python\n(.*?)```", DOCS.read_text(), re.S)
    assert match, f"recipe {name!r} not found in {DOCS}"
    return match.group(1)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.proj = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 3, bias=False)
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, idx):
        return self.head(self.norm(torch.tanh(self.proj(self.embed(idx))))) * self.scale


def trained(cls=RefAdamWMiniSF, steps=4, **kwargs):
    torch.manual_seed(0)
    model = Net()
    opt = cls(model.parameters(), lr=1e-2, **kwargs)
    for _ in range(steps):
        model(torch.randint(0, 10, (16,))).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def params(model):
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------ averaged()


@pytest.mark.parametrize("cls", [AdamWMiniSF, RefAdamWMiniSF])
def test_averaged_switches_to_x_and_back(cls):
    model, opt = trained(cls)
    y = params(model)
    with opt.averaged() as inside:
        assert inside is opt
        assert all(not g["train_mode"] for g in opt.param_groups)
        x = params(model)
    assert all(g["train_mode"] for g in opt.param_groups)
    opt.eval()
    for a, b in zip(params(model), x):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert any(not torch.allclose(a, b) for a, b in zip(x, y))  # x really differs from y here
    opt.train()
    for a, b in zip(params(model), y):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_averaged_restores_the_mode_on_an_exception():
    model, opt = trained()
    with pytest.raises(RuntimeError, match="boom"):
        with opt.averaged():
            raise RuntimeError("boom")
    assert all(g["train_mode"] for g in opt.param_groups)
    opt.step()  # would raise in eval mode


def test_averaged_in_eval_mode_stays_in_eval_mode():
    model, opt = trained()
    opt.eval()
    x = params(model)
    with opt.averaged():
        pass
    assert all(not g["train_mode"] for g in opt.param_groups)
    for a, b in zip(params(model), x):
        assert torch.equal(a, b)


def test_averaged_restores_each_groups_own_mode():
    model, opt = trained()
    opt.eval()
    extra = torch.nn.Parameter(torch.ones(3))
    opt.add_param_group({"params": [extra]})  # a new group starts in train mode
    with opt.averaged():
        pass
    assert [g["train_mode"] for g in opt.param_groups] == [False, True]


# ------------------------------------------------------- averaged_state_dict


@pytest.mark.parametrize("state_dtype", ["fp32", "bf16"])
def test_averaged_state_dict_is_x_and_leaves_y_untouched(state_dtype):
    model, opt = trained(state_dtype=state_dtype)
    y = params(model)
    saved = averaged_state_dict(model, opt)
    for a, b in zip(params(model), y):
        assert torch.equal(a, b)  # bit-identical: no eval()/train() round trip
    assert all(g["train_mode"] for g in opt.param_groups)
    opt.eval()
    expected = model.state_dict()
    assert saved.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(saved[key], expected[key], atol=1e-6, rtol=1e-6)
    assert torch.equal(saved["scale"], torch.tensor(2.0))  # buffers are copied as they are


def test_averaged_state_dict_in_eval_mode_and_before_any_step():
    model, opt = trained(steps=0)
    for key, value in averaged_state_dict(model, opt).items():
        assert torch.equal(value, model.state_dict()[key])
    model, opt = trained()
    opt.eval()
    for key, value in averaged_state_dict(model, opt).items():
        assert torch.equal(value, model.state_dict()[key])


def test_save_averaged_writes_x_whatever_the_mode(tmp_path):
    model, opt = trained()
    save_averaged(model, opt, tmp_path / "train_mode.pt")
    opt.eval()
    save_averaged(model, opt, str(tmp_path / "eval_mode.pt"))
    a, b = torch.load(tmp_path / "train_mode.pt"), torch.load(tmp_path / "eval_mode.pt")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(a[key], value, atol=1e-6, rtol=1e-6)
        assert torch.equal(b[key], value)


class Wrapper:  # like accelerate's AcceleratedOptimizer
    def __init__(self, optimizer):
        self.optimizer = optimizer


def test_helpers_unwrap_trainer_wrappers():
    model, opt = trained()
    assert unwrap_optimizer(Wrapper(Wrapper(opt))) is opt
    saved = averaged_state_dict(model, Wrapper(opt))
    torch.testing.assert_close(saved, averaged_state_dict(model, opt))


def test_checkpoint_helpers_reject_bad_arguments(tmp_path):
    model, opt = trained(steps=1)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="refadamw optimizer"):
        save_averaged(model, sgd, tmp_path / "m.pt")
    with pytest.raises(TypeError, match="refadamw optimizer"):
        unwrap_optimizer(Wrapper(None))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        save_averaged(model.state_dict(), opt, tmp_path / "m.pt")
    with pytest.raises(TypeError, match="path"):
        save_averaged(model, opt, 3)


# --------------------------------------------------------------- param_groups


def names(group):
    return [name for name, _ in group["params"]]


def test_param_groups_exempt_biases_and_norms():
    model = Net()
    decay, plain = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert names(decay) == ["embed.weight", "proj.weight", "head.weight"]
    assert names(plain) == ["proj.bias", "norm.weight", "norm.bias"]
    decay_names = names(decay)
    opt = RefAdamWMiniSF([decay, plain], lr=1e-2)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.state_dict()["param_groups"][0]["param_names"] == decay_names


def test_param_groups_name_fragments_frozen_and_named_pairs():
    model = Net()
    model.head.weight.requires_grad_(False)
    groups = param_groups(model.named_parameters(), weight_decay=0.05, no_decay=["EMBED"])
    assert names(groups[0]) == ["proj.weight"]
    assert names(groups[1]) == ["embed.weight", "proj.bias", "norm.weight", "norm.bias"]
    only_vectors = torch.nn.LayerNorm(4)
    assert [g["weight_decay"] for g in param_groups(only_vectors, weight_decay=0.1)] == [0.0]  # no empty group


def test_param_groups_reject_bad_arguments():
    model = Net()
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(model, weight_decay=-0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(model, weight_decay=float("nan"))
    with pytest.raises(TypeError, match="not the string"):
        param_groups(model, weight_decay=0.1, no_decay="bias")
    with pytest.raises(TypeError, match="non-empty strings"):
        param_groups(model, weight_decay=0.1, no_decay=["bias", ""])
    with pytest.raises(TypeError, match="pairs"):
        param_groups(list(model.parameters()), weight_decay=0.1)
    with pytest.raises(TypeError, match="module or"):
        param_groups(torch.zeros(3), weight_decay=0.1)
    weight = model.proj.weight
    with pytest.raises(ValueError, match="twice"):
        param_groups([("a", weight), ("b", weight)], weight_decay=0.1)


# ------------------------------------------------------------ plain recipe


def test_plain_loop_recipe(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 4, generator=gen)
    targets = inputs.sum(dim=1, keepdim=True)
    loader = [(inputs[i:i + 8], targets[i:i + 8]) for i in range(0, 64, 8)] * 5
    namespace = dict(model=model, loader=loader, val_inputs=inputs, val_targets=targets,
                     checkpoint_path=tmp_path / "model.pt")
    start = torch.nn.functional.mse_loss(model(inputs), targets).item()
    exec(recipe("plain"), namespace)
    opt = namespace["opt"]
    assert all(g["train_mode"] for g in opt.param_groups)  # averaged() put y back
    assert namespace["val_loss"].item() < 0.5 * start
    saved = torch.load(tmp_path / "model.pt")
    with opt.averaged():
        torch.testing.assert_close(saved, model.state_dict(), atol=1e-6, rtol=1e-6)
        val_loss = torch.nn.functional.mse_loss(model(inputs), targets)
        assert val_loss.item() == pytest.approx(namespace["val_loss"].item())


def test_import_refadamw_imports_no_trainer_library():
    import subprocess
    import sys

    code = ("import sys, refadamw, refadamw.integrations; "
            "loaded = [m for m in ('transformers', 'lightning', 'pytorch_lightning', 'accelerate') "
            "if m in sys.modules]; assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)



def _v010_writer():
    """tests/data/make_checkpoint_0.1.0.py, for its model() and grads()."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_checkpoint", Path(__file__).parent / "data"
                                                  / "make_checkpoint_0.1.0.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("cls", [AdamWMiniSF, RefAdamWMiniSF], ids=lambda c: c.__name__)
def test_a_checkpoint_written_by_version_0_1_0_loads_and_continues_bit_exactly(cls):
    """tests/data/checkpoint_0.1.0.pt was written by commit 386e9e1 (tests/data/make_checkpoint_0.1.0.py),
    before the controller was composed in and ``schedulefree_alpha`` became ``norm_ema_alpha``: the
    optimizer state_dict after 3 steps, and the averaged weights after 3 more."""
    saved = torch.load(Path(__file__).parent / "data" / "checkpoint_0.1.0.pt", weights_only=True)[cls.__name__]
    assert "schedulefree_alpha" in saved["optimizer"]["param_groups"][0]  # the old key
    writer = _v010_writer()
    model = writer.model()
    model.load_state_dict(saved["model"])
    opt = cls([{"params": [model[0].weight, model[2].weight]}, {"params": [model[0].bias, model[2].bias]}], lr=1.0)
    opt.load_state_dict(saved["optimizer"])
    assert opt.param_groups[0]["norm_ema_alpha"] == 0.1 and opt.param_groups[0]["weight_decay"] == 0.1
    assert opt.param_groups[0]["averaging_power"] == 0.0  # written before it existed: the average it was saved with
    for seed in range(3, 6):
        writer.grads(model, seed)
        opt.step()
    opt.eval()
    for p, expected in zip(model.parameters(), saved["after"]):
        assert torch.equal(p, expected)
