"""save_sharded / load_sharded in one process, with plain tensors.

``torch.distributed.checkpoint`` runs without a process group here (its
no-dist mode); the FSDP2 run of the same cases is in tests/test_distributed.py.
A checkpoint must load exactly what was saved, also when some trainable
parameters had no optimizer state at the save.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from refadamw import AdamWMiniSF, RefAdamWMiniSF, load_sharded, save_sharded

STEPS, SAVE_AT = 6, 3


class Experts(torch.nn.Module):
    """A trunk, three routed experts and two heads, of which ``unused`` never runs.

    Before the save ``late`` trains, ``frozen`` is frozen and expert 2 is never
    routed; after it ``late`` is frozen, ``frozen`` trains and expert 2 is routed.
    """

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = torch.nn.Linear(8, 16)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(3))
        self.frozen = torch.nn.Linear(16, 16)
        self.late = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 4)
        self.unused = torch.nn.Linear(16, 4)

    def set_phase(self, after_save: bool) -> None:
        self.frozen.requires_grad_(after_save)
        self.late.requires_grad_(not after_save)

    def forward(self, x, step):
        h = torch.tanh(self.trunk(x))
        routed = (0, 1, 2) if step >= SAVE_AT else (0, 1)
        h = sum(self.experts[e](h) for e in routed)
        return self.head(self.late(self.frozen(h)))


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 8, generator=gen), torch.randn(4, 4, generator=gen)) for _ in range(STEPS)]


def train(model, opt, data, steps):
    for step in steps:
        x, y = data[step]
        torch.nn.functional.mse_loss(model(x, step), y).backward()
        opt.step()
        opt.zero_grad()


def state_of(opt, model) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.clone() for k, v in opt.state[p].items()}
            for name, p in model.named_parameters() if opt.state.get(p)}


@pytest.mark.parametrize("cls", [AdamWMiniSF, RefAdamWMiniSF])
def test_load_sharded_loads_exactly_what_was_saved_and_resumes_bit_identically(cls, tmp_path):
    warnings.filterwarnings("ignore", message=".*torch.distributed.*")  # dcp's no-dist mode warns on every call
    data = batches()
    model = Experts()
    model.set_phase(after_save=False)
    opt = cls(model.parameters(), lr=1e-2)  # default bf16 state
    train(model, opt, data, range(SAVE_AT))
    save_sharded(model, opt, tmp_path)
    saved_state = state_of(opt, model)
    stateless = {n for n, _ in model.named_parameters()} - set(saved_state)
    assert stateless == {f"{m}.{k}" for m in ("experts.2", "frozen", "unused") for k in ("weight", "bias")}
    model.set_phase(after_save=True)
    train(model, opt, data, range(SAVE_AT, STEPS))

    resumed = Experts()
    resumed.set_phase(after_save=True)  # trainable now: `frozen`, expert 2 and `unused`; `late` no longer
    opt2 = cls(resumed.parameters(), lr=1e-2)
    load_sharded(resumed, opt2, tmp_path)
    loaded = state_of(opt2, resumed)
    assert set(loaded) == set(saved_state)  # the stateless ones stay stateless, `late` keeps its state
    for name, state in saved_state.items():
        assert loaded[name].keys() == state.keys()
        for key, value in state.items():
            assert loaded[name][key].dtype == value.dtype and torch.equal(loaded[name][key], value), (name, key)
    opt2.train()
    train(resumed, opt2, data, range(SAVE_AT, STEPS))

    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    final, final2 = state_of(opt, model), state_of(opt2, resumed)
    assert final.keys() == final2.keys() and "frozen.weight" in final and "unused.weight" not in final
    for name, state in final.items():
        for key, value in state.items():
            assert torch.equal(final2[name][key], value), (name, key)
    if cls is RefAdamWMiniSF:
        for key, value in opt.controller.state_dict().items():
            assert torch.equal(torch.as_tensor(opt2.controller.state_dict()[key]), torch.as_tensor(value)), key


def test_load_sharded_refuses_a_checkpoint_with_more_parameters(tmp_path):
    warnings.filterwarnings("ignore", message=".*torch.distributed.*")
    big = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    opt = AdamWMiniSF(big.parameters())
    big(torch.randn(2, 4)).sum().backward()
    opt.step()
    save_sharded(big, opt, tmp_path)
    small = torch.nn.Sequential(torch.nn.Linear(4, 4))
    opt2 = AdamWMiniSF(small.parameters())
    with pytest.raises(ValueError, match=r"parameter ids \[2, 3\].*has 2 parameters"):
        load_sharded(small, opt2, tmp_path)
    assert not opt2.state
