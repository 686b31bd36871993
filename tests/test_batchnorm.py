"""refadamw.recompute_bn_stats against statistics computed directly from the batches."""

from __future__ import annotations

import pytest
import torch

from refadamw import recompute_bn_stats

LAYERS = {
    "1d": (torch.nn.BatchNorm1d, (6, 3)),
    "1d, sequence": (torch.nn.BatchNorm1d, (6, 3, 5)),
    "2d": (torch.nn.BatchNorm2d, (6, 3, 4, 4)),
    "3d": (torch.nn.BatchNorm3d, (6, 3, 2, 3, 3)),
    "sync": (torch.nn.SyncBatchNorm, (6, 3, 4, 4)),  # no process group: it normalises like BatchNorm
}


def _batches(shape, n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * (1 + i) + i for i in range(n)]


class Recorder(torch.nn.Module):
    """Records, on each call, its own train flag and whether autograd is on."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append((self.training, torch.is_grad_enabled()))
        return x


@pytest.mark.parametrize("kind", list(LAYERS))
def test_statistics_are_the_plain_average_over_the_batches(kind):
    layer_cls, shape = LAYERS[kind]
    bn = layer_cls(3, momentum=0.3)
    model = torch.nn.Sequential(Recorder(), bn, torch.nn.Dropout(0.5))
    model.train()
    model[2].eval()  # a mix of flags, to be put back as found
    batches = _batches(shape)
    assert recompute_bn_stats(model, batches) == len(batches)
    dims = [0] + list(range(2, len(shape)))
    mean = torch.stack([b.mean(dim=dims) for b in batches]).mean(0)
    var = torch.stack([b.var(dim=dims, unbiased=True) for b in batches]).mean(0)  # momentum=None: the average
    torch.testing.assert_close(bn.running_mean, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_var, var, atol=1e-5, rtol=1e-5)
    assert int(bn.num_batches_tracked) == len(batches)
    assert bn.momentum == 0.3
    assert [m.training for m in model] == [True, True, False]
    assert model[0].seen == [(False, False)] * len(batches)  # other modules in eval mode, no autograd


def test_dict_and_tuple_batches_and_a_custom_forward():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm1d(2)

        def forward(self, inputs, labels=None):
            return self.bn(inputs)

    batches = _batches((5, 2), n=3)
    expected = torch.stack([b.mean(0) for b in batches]).mean(0)
    for wrapped, forward in (([{"inputs": b, "labels": b} for b in batches], None),  # model(**batch)
                             ([(b, b.sum(1)) for b in batches], None),  # model(batch[0])
                             ([{"x": b} for b in batches], lambda m, batch: m(batch["x"]))):
        net = Net()
        assert recompute_bn_stats(net, wrapped, forward=forward) == 3
        torch.testing.assert_close(net.bn.running_mean, expected, atol=1e-6, rtol=1e-6)


def test_without_batchnorm_or_batches_nothing_changes():
    assert recompute_bn_stats(torch.nn.Linear(2, 2), _batches((4, 2))) == 0
    bn = torch.nn.BatchNorm1d(2)
    bn.running_mean.fill_(3.0)
    assert recompute_bn_stats(bn, []) == 0
    assert torch.equal(bn.running_mean, torch.full((2,), 3.0)) and int(bn.num_batches_tracked) == 0
    frozen = torch.nn.BatchNorm1d(2, track_running_stats=False)
    assert recompute_bn_stats(frozen, _batches((4, 2))) == 0


def test_a_failing_pass_puts_everything_back():
    bn = torch.nn.BatchNorm1d(2, momentum=0.2)
    bn.running_mean.fill_(3.0)
    bn.num_batches_tracked.fill_(7)
    model = torch.nn.Sequential(bn)

    def batches():
        yield torch.randn(4, 2)
        raise RuntimeError("data loader broke")

    with pytest.raises(RuntimeError, match="broke"):
        recompute_bn_stats(model, batches())
    assert torch.equal(bn.running_mean, torch.full((2,), 3.0)) and int(bn.num_batches_tracked) == 7
    assert bn.momentum == 0.2 and bn.training


def test_bad_arguments_are_rejected():
    with pytest.raises(TypeError, match="model"):
        recompute_bn_stats("model", [])
    with pytest.raises(TypeError, match="forward"):
        recompute_bn_stats(torch.nn.BatchNorm1d(2), [], forward=3)


def test_the_docs_recipe_recomputes_at_x_and_leaves_y():
    import re
    from pathlib import Path

    from refadamw import RefAdamWMiniSF

    doc = (Path(__file__).resolve().parents[1] / "docs" / "integrations.md").read_text()
    code = re.search(r"<!-- recipe: batchnorm -->\n```python\n(.*?)```", doc, re.S).group(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    opt = RefAdamWMiniSF(model.parameters(), lr=1e-1)
    loader = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(5)]
    for inputs, targets in loader:
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        opt.step()
        opt.zero_grad()
    y = [p.detach().clone() for p in model.parameters()]
    with opt.averaged():
        x = [p.detach().clone() for p in model.parameters()]
    namespace = dict(model=model, opt=opt, loader=loader, torch=torch, val_inputs=loader[0][0],
                     val_targets=loader[0][1])
    exec(code, namespace)
    hidden = [inputs @ x[0].T + x[1] for inputs, _ in loader]  # the first layer at x
    torch.testing.assert_close(model[1].running_mean, torch.stack([h.mean(0) for h in hidden]).mean(0),
                               atol=1e-5, rtol=1e-5)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(model.parameters(), y))  # back at y
