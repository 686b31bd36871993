"""Lightning: the docs recipe on a tiny regression model, plus the DDP loss hook."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

L = pytest.importorskip("lightning")

from refadamw import RefAdamWMiniSF  # noqa: E402
from refadamw.integrations.lightning import RefAdamWCallback, mean_loss_closure  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
MAX_STEPS = 10


def recipe(name: str) -> str:
    """The code block marked ``<!-- recipe: name -->`` in docs/integrations.md."""
    match = re.search(rf"<!-- recipe: {re.escape(name)} -->\n```python\n(.*?)```", DOCS.read_text(), re.S)
    assert match, f"recipe {name!r} not found in {DOCS}"
    return match.group(1)


def data(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 4, generator=gen)
    return torch.utils.data.TensorDataset(inputs, inputs.sum(dim=1, keepdim=True))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    val = data(16, 1)
    namespace = dict(net=net, max_steps=MAX_STEPS, output_dir=str(tmp_path_factory.mktemp("lightning")),
                     train_loader=torch.utils.data.DataLoader(data(80, 0), batch_size=8),  # 10 batches an epoch
                     val_loader=torch.utils.data.DataLoader(val, batch_size=16))
    exec(recipe("lightning"), namespace)
    return dict(namespace, val=val)


def test_callback_feeds_the_controller(trained):
    opt = trained["trainer"].optimizers[0]
    assert isinstance(opt, RefAdamWMiniSF)
    assert opt.total_steps == MAX_STEPS  # estimated_stepping_batches reached step()
    controller = opt.controller.state_dict()
    assert int(controller["t"]) == MAX_STEPS
    assert bool(controller["loss_seen"])  # the closure's loss
    assert int(controller["val_count"]) == 2  # val_loss at steps 5 and 10; the sanity check is not fed


def test_validation_and_checkpoints_use_the_averaged_weights(trained):
    trainer, net = trained["trainer"], trained["net"]
    opt = trainer.optimizers[0]
    assert all(not g["train_mode"] for g in opt.param_groups)  # training ended in x
    inputs, targets = trained["val"].tensors
    with torch.no_grad():
        x_loss = torch.nn.functional.mse_loss(net(inputs), targets)
    # The last validation ran at step 10, the last step: it saw x.
    torch.testing.assert_close(trainer.callback_metrics["val_loss"], x_loss, atol=1e-6, rtol=1e-5)
    checkpoints = sorted(Path(trainer.default_root_dir).rglob("*.ckpt"))
    assert checkpoints
    checkpoint = torch.load(checkpoints[-1], weights_only=False)
    assert checkpoint["global_step"] == MAX_STEPS
    for key, value in net.state_dict().items():
        torch.testing.assert_close(checkpoint["state_dict"][f"net.{key}"], value, atol=1e-6, rtol=1e-6)
    assert all(not g["train_mode"] for g in checkpoint["optimizer_states"][0]["param_groups"])
    opt.train()
    try:  # and x is not y: the test would catch a checkpoint of the training point
        assert any(not torch.allclose(checkpoint["state_dict"][f"net.{k}"], v) for k, v in net.state_dict().items())
    finally:
        opt.eval()


class MeanOverRanks:
    """Stands in for a Lightning strategy: reduce() returns a fixed "mean over ranks"."""

    def reduce(self, tensor, reduce_op):
        assert reduce_op == "mean"
        return torch.tensor(5.0)


def test_mean_loss_closure_feeds_the_reduced_loss():
    param = torch.nn.Parameter(torch.ones(3))
    opt = RefAdamWMiniSF([param], lr=1e-2)
    opt.register_step_pre_hook(mean_loss_closure(MeanOverRanks()))
    calls = []

    def closure():
        calls.append(1)
        loss = param.square().sum()
        loss.backward()
        return loss

    assert opt.step(closure=closure) == torch.tensor(5.0)
    assert opt.step(closure) == torch.tensor(5.0)  # positional too
    assert len(calls) == 2  # the real closure ran once per step
    assert float(opt.controller.state_dict()["loss_ema"]) == 5.0
    opt.step()  # no closure: nothing to wrap


def test_bad_arguments_are_rejected():
    with pytest.raises(TypeError, match="val_loss_key"):
        RefAdamWCallback(val_loss_key=None)
    with pytest.raises(ValueError, match="bn_batches"):
        RefAdamWCallback(bn_batches=-1)
    with pytest.raises(TypeError, match="bn_forward"):
        RefAdamWCallback(bn_forward=3)


class AveragedWeights(L.Callback):
    """After each optimizer step (train mode): x = y − (1−β1)/β1·(z − y) in float64, by parameter name."""

    def __init__(self):
        self.x = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opt = trainer.optimizers[0]
        assert all(g["train_mode"] for g in opt.param_groups)
        beta1 = opt.param_groups[0]["betas"][0]
        self.x[trainer.global_step] = {
            name: p.detach().double() - (1 - beta1) / beta1 * opt.state[p]["z_minus_y"].double()
            for name, p in pl_module.named_parameters()}


class BatchNormRegressor(L.LightningModule):
    def __init__(self, lr=3e-2):
        super().__init__()
        torch.manual_seed(0)
        self.first = torch.nn.Linear(4, 8)
        self.norm = torch.nn.BatchNorm1d(8)
        self.head = torch.nn.Linear(8, 1)
        self.lr = lr

    def forward(self, inputs):
        return self.head(torch.relu(self.norm(self.first(inputs))))

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return torch.nn.functional.mse_loss(self(inputs), targets)

    def configure_optimizers(self):
        return RefAdamWMiniSF(self.parameters(), lr=self.lr)


@pytest.mark.parametrize("bn_batches", [3, 0])
def test_epoch_checkpoints_without_validation_hold_x_and_its_batchnorm_statistics(bn_batches, tmp_path):
    train = data(64, 0)
    recorder = AveragedWeights()
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1,
                                                      filename="{epoch}-{step}")
    trainer = L.Trainer(max_epochs=2, limit_val_batches=0, callbacks=[RefAdamWCallback(bn_batches=bn_batches),
                                                                      recorder, checkpoints],
                        default_root_dir=tmp_path, accelerator="cpu", enable_progress_bar=False, logger=False)
    module = BatchNormRegressor()
    trainer.fit(module, torch.utils.data.DataLoader(train, batch_size=8, shuffle=True))
    saved = sorted(tmp_path.glob("*.ckpt"))
    assert [c.name for c in saved] == ["epoch=0-step=8.ckpt", "epoch=1-step=16.ckpt"]
    for path in saved:
        checkpoint = torch.load(path, weights_only=False)
        step = checkpoint["global_step"]
        x = recorder.x[step]
        for name, value in x.items():
            torch.testing.assert_close(checkpoint["state_dict"][name].double(), value, atol=1e-6, rtol=1e-6)
        running_mean = checkpoint["state_dict"]["norm.running_mean"].double()
        if bn_batches:  # the first-layer output at x over the first 3 training batches, in order
            hidden = [train.tensors[0][i * 8:(i + 1) * 8].double() @ x["first.weight"].T + x["first.bias"]
                      for i in range(bn_batches)]
            torch.testing.assert_close(running_mean, torch.stack([h.mean(0) for h in hidden]).mean(0),
                                       atol=1e-5, rtol=1e-5)
            assert int(checkpoint["state_dict"]["norm.num_batches_tracked"]) == bn_batches
        else:  # gathered during training, with momentum
            assert int(checkpoint["state_dict"]["norm.num_batches_tracked"]) == step
    assert module.norm.momentum == 0.1
