"""Hugging Face Trainer: the docs recipe on a tiny GPT-2 built from a config (no downloads)."""

from __future__ import annotations

import logging

import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
safetensors_torch = pytest.importorskip("safetensors.torch")

from refadamw import AdamWMiniSF, RefAdamWMiniSF  # noqa: E402
from refadamw.integrations.hf import RefAdamWCallback, optimizer_cls_and_kwargs, trainer_optimizers  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
MAX_STEPS = 10


def recipe(name: str) -> str:
    """The code block marked ``<!-- recipe: name -->`` in docs/integrations.md."""
    match = re.search(rf"<!-- recipe: {re.escape(name)} -->\n```python\n(.*?)```", DOCS.read_text(), re.S)
    assert match, f"recipe {name!r} not found in {DOCS}"
    return match.group(1)


class Tokens(torch.utils.data.Dataset):
    """Random token sequences as causal-LM examples."""

    def __init__(self, n: int, seed: int):
        self.ids = torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    return transformers.GPT2LMHeadModel(config)


def run_recipe(output_dir: Path) -> dict:
    namespace = dict(model=tiny_gpt2(), output_dir=str(output_dir), max_steps=MAX_STEPS,
                     train_dataset=Tokens(64, 0), eval_dataset=Tokens(16, 1))
    exec(recipe("hf"), namespace)
    return namespace


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return run_recipe(tmp_path_factory.mktemp("hf"))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return safetensors_torch.load_file(str(path))


def test_callback_unwraps_accelerate_and_feeds_the_controller(trained):
    trainer = trained["trainer"]
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, RefAdamWMiniSF)
    assert opt.total_steps == MAX_STEPS  # state.max_steps reached step()
    controller = opt.controller.state_dict()
    assert bool(controller["loss_seen"])  # logged losses were observed
    assert int(controller["val_count"]) == 2  # eval_loss at steps 5 and 10
    assert int(controller["t"]) == MAX_STEPS
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]


def test_saved_weights_are_the_averaged_ones(trained):
    trainer, model = trained["trainer"], trained["model"]
    opt = trainer.optimizer.optimizer
    assert all(not g["train_mode"] for g in opt.param_groups)  # training ended in x
    x = {k: v.detach().clone() for k, v in model.state_dict().items()}
    final = weights(Path(trainer.args.output_dir) / "model.safetensors")
    last_checkpoint = weights(Path(trainer.args.output_dir) / f"checkpoint-{MAX_STEPS}" / "model.safetensors")
    for key, value in final.items():
        assert torch.equal(value, x[key])
        assert torch.equal(last_checkpoint[key], x[key])
    opt.train()
    try:  # and x is not y: the test would catch a checkpoint of the training point
        y = model.state_dict()
        assert any(not torch.allclose(final[k], y[k]) for k in final)
    finally:
        opt.eval()
    optim_state = torch.load(Path(trainer.args.output_dir) / f"checkpoint-{MAX_STEPS}" / "optimizer.pt",
                             weights_only=False)
    assert all(not g["train_mode"] for g in optim_state["param_groups"])  # saved in eval mode, matching x


def test_resume_from_checkpoint_matches_uninterrupted(trained, tmp_path):
    first = Path(trained["trainer"].args.output_dir)
    namespace = dict(model=tiny_gpt2(), output_dir=str(first), max_steps=MAX_STEPS,
                     train_dataset=Tokens(64, 0), eval_dataset=Tokens(16, 1))
    code = recipe("hf").replace("trainer.train()", "trainer.train(resume_from_checkpoint=resume)")
    code = code.replace("trainer.save_model()", "trainer.save_model(final_dir)")
    exec(code, dict(namespace, resume=str(first / "checkpoint-5"), final_dir=str(tmp_path)))
    resumed = weights(tmp_path / "model.safetensors")
    uninterrupted = weights(first / "model.safetensors")
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, atol=1e-5, rtol=1e-4)


def test_optimizer_cls_and_kwargs_path(tmp_path):
    model = tiny_gpt2()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), weight_decay=0.1, lr_scheduler_type="constant",
                                          report_to=[], max_steps=2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(8, 0),
                                   optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(lr=3e-3, total_steps=2),
                                   callbacks=[RefAdamWCallback()])
    opt = trainer.create_optimizer()
    assert isinstance(opt, RefAdamWMiniSF)
    assert opt.param_groups[0]["lr"] == 3e-3 and opt.total_steps == 2
    assert sorted({g["weight_decay"] for g in opt.param_groups}) == [0.0, 0.1]


def test_trainer_optimizers_returns_a_constant_schedule():
    opt, scheduler = trainer_optimizers(tiny_gpt2(), optimizer_cls=AdamWMiniSF, lr=1e-3, weight_decay=0.1)
    assert type(opt) is AdamWMiniSF
    for _ in range(3):
        opt.step()
        scheduler.step()
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3]


def test_a_missing_lr_is_warned_about_where_the_trainer_would_drop_learning_rate(caplog):
    """The Trainer never passes TrainingArguments.learning_rate to these optimizers, so a user who set
    it only there would train at the lr-free default without knowing."""
    model = tiny_gpt2()
    with caplog.at_level(logging.WARNING, logger="refadamw"):
        trainer_optimizers(model, lr=1e-5)
        optimizer_cls_and_kwargs(lr=1e-5, total_steps=2)
    assert not [r for r in caplog.records if "no lr given" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="refadamw"):
        opt, _ = trainer_optimizers(model)
        optimizer_cls_and_kwargs(AdamWMiniSF)
    warned = [r.getMessage() for r in caplog.records if "no lr given" in r.getMessage()]
    assert len(warned) == 2 and all("lr-free" in m and "learning_rate" in m for m in warned)
    assert opt.param_groups[0]["lr_free"] is True


def test_bad_arguments_are_rejected():
    with pytest.raises(TypeError, match="eval_loss_key"):
        RefAdamWCallback(eval_loss_key="")
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="bn_batches"):
            RefAdamWCallback(bn_batches=bad)
    with pytest.raises(TypeError, match="optimizer_cls"):
        trainer_optimizers(tiny_gpt2(), optimizer_cls=torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="optimizer_cls"):
        optimizer_cls_and_kwargs(torch.optim.AdamW, lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        optimizer_cls_and_kwargs(lr=-1.0)


# ---------------------------------------------------------------- checkpoints hold x, for every save strategy

class AveragedWeights(transformers.TrainerCallback):
    """Records, right after each optimizer step (train mode, before any switch), the averaged
    weights x = y − (1−β1)/β1·(z − y) (SPEC §3 item 4) in float64 from y and the stored z − y,
    keyed by parameter identity, and the training point y."""

    def __init__(self):
        self.x: dict[int, dict[int, torch.Tensor]] = {}
        self.y: dict[int, dict[int, torch.Tensor]] = {}

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        opt = optimizer.optimizer
        xs, ys = {}, {}
        for group in opt.param_groups:
            assert group["train_mode"]  # the step ran at y
            beta1 = group["betas"][0]
            for p in group["params"]:
                y = p.detach().double()
                xs[id(p)] = y - (1 - beta1) / beta1 * opt.state[p]["z_minus_y"].double()
                ys[id(p)] = y.clone()
        self.x[state.global_step + 1] = xs
        self.y[state.global_step + 1] = ys


def _by_key(model, per_param: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: per_param[id(v)] for k, v in model.state_dict(keep_vars=True).items() if id(v) in per_param}


def _assert_holds_x(saved: dict, model, recorder: AveragedWeights, step: int) -> None:
    x, y = _by_key(model, recorder.x[step]), _by_key(model, recorder.y[step])
    keys = [k for k in saved if k in x]
    assert keys
    for key in keys:
        torch.testing.assert_close(saved[key].double(), x[key], atol=1e-6, rtol=1e-6, msg=f"step {step}, {key}")
    # x is far from y here, so a checkpoint of the training point would fail the check above
    assert max((x[k] - y[k]).abs().max().item() for k in keys) > 2e-5


STRATEGIES = {
    # name: (TrainingArguments overrides, train set size, checkpoints expected)
    "steps, the run ending between saves": (dict(save_strategy="steps", save_steps=3, max_steps=8), 64, [3, 6, 8]),
    "epoch, no evaluation": (dict(save_strategy="epoch", num_train_epochs=2), 16, [4, 8]),
    "epoch, gradient accumulation 2": (dict(save_strategy="epoch", num_train_epochs=2, per_device_train_batch_size=2,
                                            gradient_accumulation_steps=2), 16, [4, 8]),
    "epoch, the run ending mid-epoch": (dict(save_strategy="epoch", max_steps=6), 16, [4, 6]),
    "save_only_model": (dict(save_strategy="steps", save_steps=4, max_steps=8, save_only_model=True), 64, [4, 8]),
    "best": (dict(save_strategy="best", eval_strategy="steps", eval_steps=2, max_steps=6,
                  metric_for_best_model="eval_loss"), 64, None),
    "load_best_model_at_end": (dict(save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2,
                                    max_steps=6, load_best_model_at_end=True, metric_for_best_model="eval_loss"),
                               64, [2, 4, 6]),
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_checkpoint_holds_the_averaged_weights(strategy, tmp_path):
    overrides, n_train, expected = STRATEGIES[strategy]
    model, recorder = tiny_gpt2(), AveragedWeights()
    args = transformers.TrainingArguments(**{**dict(output_dir=str(tmp_path), per_device_train_batch_size=4,
                                                    logging_steps=1, report_to=[], disable_tqdm=True), **overrides})
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(n_train, 0),
                                   eval_dataset=Tokens(8, 1),
                                   optimizers=trainer_optimizers(model, lr=1e-2, weight_decay=0.01),
                                   callbacks=[RefAdamWCallback(), recorder])
    trainer.train()
    steps = sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("checkpoint-*"))
    if expected is not None:
        assert steps == expected
    assert steps
    for step in steps:
        folder = tmp_path / f"checkpoint-{step}"
        _assert_holds_x(weights(folder / "model.safetensors"), model, recorder, step)
        if not args.save_only_model:
            state = torch.load(folder / "optimizer.pt", weights_only=False)
            assert all(not g["train_mode"] for g in state["param_groups"])  # eval mode, matching x
    final = trainer.state.global_step
    live = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if args.load_best_model_at_end:
        best = Path(trainer.state.best_model_checkpoint)
        assert best.name != f"checkpoint-{final}"  # else this case would not test the reload
        for key, value in weights(best / "model.safetensors").items():
            assert torch.equal(live[key], value)  # the best x, as saved
    else:
        _assert_holds_x(live, model, recorder, final)
    trainer.save_model(str(tmp_path / "final"))
    assert all(torch.equal(v, live[k]) for k, v in weights(tmp_path / "final" / "model.safetensors").items())


# ---------------------------------------------------------------- the per-step loss feed

@pytest.mark.parametrize("accumulation", [1, 2])
def test_step_loss_mixin_feeds_one_loss_per_optimizer_step_before_it(accumulation, tmp_path):
    from refadamw.integrations.hf import RefAdamWTrainer

    model = tiny_gpt2()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                                          gradient_accumulation_steps=accumulation, logging_steps=1,
                                          save_strategy="no", report_to=[], disable_tqdm=True)
    trainer = RefAdamWTrainer(model=model, args=args, train_dataset=Tokens(32, 0),
                              optimizers=trainer_optimizers(model, lr=1e-3))  # adds RefAdamWCallback itself
    opt = trainer.optimizer
    fed = []  # (controller steps taken when the loss arrived, the loss)
    observe = opt.observe

    def recording_observe(loss=None, val_loss=None):
        if loss is not None:
            fed.append((int(opt.controller.state_dict()["t"]), loss))
        observe(loss=loss, val_loss=val_loss)

    opt.observe = recording_observe
    trainer.train()
    assert [t for t, _ in fed] == [0, 1, 2, 3]  # one loss before each of the 4 steps, none from the logs
    assert all(isinstance(loss, torch.Tensor) and loss.dim() == 0 for _, loss in fed)  # no host sync
    # The Trainer's own per-step loss (logging_steps=1: the mean over the step's micro-batches).
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 4
    for (_, loss), expected in zip(fed, logged):
        assert abs(loss.item() - expected) < 1e-5


def test_plain_trainer_feeds_the_logged_loss(tmp_path):
    model = tiny_gpt2()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                                          logging_steps=2, save_strategy="no", report_to=[], disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(32, 0),
                                   optimizers=trainer_optimizers(model, lr=1e-3), callbacks=[RefAdamWCallback()])
    opt, fed = trainer.optimizer, []
    observe = opt.observe
    opt.observe = lambda loss=None, val_loss=None: (fed.append(loss) if loss is not None else None,
                                                                observe(loss=loss, val_loss=val_loss))
    trainer.train()
    assert len(fed) == 2  # one per logging interval, after it: the documented limit of a plain Trainer


# ---------------------------------------------------------------- BatchNorm statistics at x

class Pairs(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.inputs = torch.randn(n, 4, generator=gen) * 2 + 1
        self.labels = self.inputs.sum(dim=1, keepdim=True).tanh()

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, i):
        return {"inputs": self.inputs[i], "labels": self.labels[i]}


class BatchNormRegressor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = torch.nn.Linear(4, 8)
        self.norm = torch.nn.BatchNorm1d(8)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, inputs, labels=None):
        out = self.head(torch.relu(self.norm(self.first(inputs))))
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


@pytest.mark.parametrize("bn_batches", [3, 0])
def test_checkpoints_hold_batchnorm_statistics_recomputed_at_x(bn_batches, tmp_path):
    model, recorder, train = BatchNormRegressor(), AveragedWeights(), Pairs(64, 0)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=6,
                                          save_strategy="steps", save_steps=3, logging_steps=1, report_to=[],
                                          disable_tqdm=True)
    gathered = {}

    class GatheredStatistics(transformers.TrainerCallback):  # the running stats as training left them
        def on_optimizer_step(self, args, state, control, **kwargs):
            gathered[state.global_step + 1] = model.norm.running_mean.clone()

    trainer = transformers.Trainer(model=model, args=args, train_dataset=train,
                                   optimizers=trainer_optimizers(model, lr=3e-2),
                                   callbacks=[RefAdamWCallback(bn_batches=bn_batches), recorder,
                                              GatheredStatistics()])
    trainer.train()
    for step in (3, 6):
        saved = weights(tmp_path / f"checkpoint-{step}" / "model.safetensors")
        x = _by_key(model, recorder.x[step])
        _assert_holds_x(saved, model, recorder, step)
        # The first-layer output at x over the first bn_batches training batches, in order.
        hidden = [train.inputs[i * 8:(i + 1) * 8].double() @ x["first.weight"].T + x["first.bias"]
                  for i in range(bn_batches)]
        if bn_batches:
            mean = torch.stack([h.mean(0) for h in hidden]).mean(0)
            var = torch.stack([h.var(0) for h in hidden]).mean(0)
            torch.testing.assert_close(saved["norm.running_mean"].double(), mean, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(saved["norm.running_var"].double(), var, atol=1e-5, rtol=1e-5)
            assert int(saved["norm.num_batches_tracked"]) == bn_batches
            assert (saved["norm.running_mean"] - gathered[step]).abs().max() > 1e-3  # not the gathered ones
        else:  # recomputation off: the statistics gathered during training
            torch.testing.assert_close(saved["norm.running_mean"], gathered[step], atol=0, rtol=0)
    assert model.norm.momentum == 0.1 and model.training  # put back


def test_a_fused_backward_pass_under_the_trainer(tmp_path):
    """docs/fused_backward.md: the hooks step inside the Trainer's backward, its own clipping is off
    (the gradients are gone by then), and its step() finishes each step; accumulation is refused."""
    from refadamw import fused_backward
    from refadamw.integrations.hf import RefAdamWTrainer

    def trainer(accumulation: int, fused: bool = True):
        model = tiny_gpt2()
        optimizers = trainer_optimizers(model, lr=1e-3, fused_back_pass=fused)
        if fused:
            fused_backward(model, optimizers[0], max_grad_norm=1.0)
        args = transformers.TrainingArguments(output_dir=str(tmp_path / f"{accumulation}{fused}"), max_steps=MAX_STEPS,
                                              max_grad_norm=0.0 if fused else 1.0,
                                              gradient_accumulation_steps=accumulation,
                                              save_strategy="no", report_to=[], logging_steps=1)
        return RefAdamWTrainer(model=model, args=args, train_dataset=Tokens(64, 0), optimizers=optimizers,
                               callbacks=[RefAdamWCallback()]), optimizers[0]

    run, opt = trainer(1)
    run.train()
    assert opt.stats()["steps"].item() == MAX_STEPS and opt.stats()["skipped_steps"].item() == 0
    assert int(opt.controller.state_dict()["t"]) == MAX_STEPS
    assert all(p.grad is None for p in run.model.parameters())
    ordinary, _ = trainer(1, fused=False)
    ordinary.train()
    losses = [[entry["loss"] for entry in r.state.log_history if "loss" in entry] for r in (run, ordinary)]
    assert losses[0][0] == losses[1][0]  # the same first batch and weights
    assert losses[0][1:] != losses[1][:-1]  # each step trained...
    assert losses[0][-1] == pytest.approx(losses[1][-1], rel=2e-3)  # ...as the ordinary path did
    run, _ = trainer(2)
    with pytest.raises(RuntimeError, match="gradient accumulation"):
        run.train()
