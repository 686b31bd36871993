"""RefAdamWMiniSF: the controller wired into the optimizer (SPEC.md §3 items 5–6, §3b)."""

from __future__ import annotations

import io
import logging

import pytest
import torch

from refadamw import AdamWMiniSF, RefAdamWMiniSF
from refadamw.controller import Decision

from .spec_reference import SpecHyper, SpecParam, spec_step


def _pair(seed=0):
    torch.manual_seed(seed)
    a = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 4))
    b = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 4))
    b.load_state_dict(a.state_dict())
    return a, b


def _loss(model, step):
    gen = torch.Generator().manual_seed(step)
    return model(torch.randn(16, 64, generator=gen)).pow(2).mean()


@pytest.mark.parametrize("feed", ["none", "loss", "closure"])
def test_without_injection_or_trouble_it_is_adamw_mini_sf(feed):
    """λ = 0 and a quiet controller leave the arithmetic bit-identical to AdamWMiniSF."""
    a, b = _pair()
    ref = RefAdamWMiniSF(a.parameters(), ref_alpha=0.0, total_steps=40)
    plain = AdamWMiniSF(b.parameters())
    for step in range(40):
        for model, opt in ((a, ref), (b, plain)):
            def closure(model=model, opt=opt):
                opt.zero_grad()
                loss = _loss(model, step)
                loss.backward()
                return loss
            if opt is ref and feed == "closure":
                opt.step(closure)
                continue
            loss = closure()
            if opt is ref and feed == "loss":
                opt.step(loss=loss.detach(), val_loss=float(step))
            else:
                opt.step()
    assert ref.stats()["flagged_steps"].item() == 0
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


SCRIPT = [  # (λ, ρ, skip) per step: injection, a level-1 pull, a level-3 skip, injection again
    # (values exact in fp32, the controller's dtype)
    (0.0, 0.0, False), (0.25, 0.0, False), (0.25, 0.0, False), (0.0, 0.625, False),
    (0.0, 1.0, True), (0.0, 0.75, False), (0.5, 0.0, False), (0.375, 0.0, False),
]


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("schedule_free", [True, False])
def test_scripted_decisions_match_the_float64_reference(foreach, schedule_free):
    hp = SpecHyper(lr=2e-2, weight_decay=0.1, warmup_steps=2, auto_lr=False, schedule_free=schedule_free)
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(s, generator=gen, dtype=torch.float64) for s in ((96, 64), (96,), (5, 3))]
    params = [torch.nn.Parameter(v.clone()) for v in values]
    spec = [SpecParam(y=v.clone()) for v in values]
    opt = RefAdamWMiniSF(params, lr=hp.lr, betas=(hp.beta1, hp.beta2), weight_decay=hp.weight_decay,
                         warmup_steps=hp.warmup_steps, schedule_free=schedule_free, foreach=foreach,
                         total_steps=len(SCRIPT))
    script = iter(SCRIPT)

    def scripted(grad_norm, max_steps=None):
        lam, pull, skip = next(script)
        return Decision(torch.tensor(lam), torch.tensor(pull), torch.tensor(skip), torch.tensor(0))

    opt.controller.decide = scripted
    for lam, pull, skip in SCRIPT:
        grads = [torch.randn(v.shape, generator=gen, dtype=torch.float64) for v in values]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        spec_step(spec, grads, hp, lam=lam if schedule_free else 0.0, pull=pull if schedule_free else 0.0,
                  skip=skip)
        for p, sp in zip(params, spec):
            torch.testing.assert_close(p.detach(), sp.y, rtol=1e-9, atol=1e-11)
    assert opt.stats()["skipped_steps"].item() == 1


def _force_level_3(opt):
    """Make the controller answer every step with level 3: pull ρ = 1 and skip."""
    opt.controller.decide = lambda g, m=None: Decision(torch.tensor(0.0), torch.tensor(1.0), torch.tensor(True),
                                                       torch.tensor(3))


def _trained_weight(shape, steps):
    weight = torch.nn.Parameter(torch.randn(shape))
    opt = RefAdamWMiniSF([weight], total_steps=100, state_dtype="fp32")  # exact comparisons below
    for _ in range(steps):
        weight.grad = torch.randn(shape)
        opt.step()
    return weight, opt


def test_pull_of_one_puts_the_iterate_on_the_average():
    weight, opt = _trained_weight((32, 32), 5)
    opt.eval()
    average = weight.detach().clone()
    opt.train()
    _force_level_3(opt)
    weight.grad = torch.randn(32, 32) * 1000
    opt.step()
    torch.testing.assert_close(weight.detach(), average)  # y = x
    torch.testing.assert_close(weight.detach() + opt.state[weight]["z_minus_y"], average)  # z = x


def test_non_finite_gradient_is_never_repaired_into_the_weights():
    weight, opt = _trained_weight((8, 8), 3)
    before = weight.detach().clone(), opt.state[weight]["z_minus_y"].clone()
    _force_level_3(opt)
    weight.grad = torch.full((8, 8), float("nan"))
    opt.step()
    assert torch.equal(weight, before[0]) and torch.equal(opt.state[weight]["z_minus_y"], before[1])


def _regression(opt_cls, **kwargs):
    """A small MLP regression (model, optimizer, batch generator, inputs, targets), the same every call."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = opt_cls(model.parameters(), lr=1e-2, **kwargs)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 8, generator=gen)
    return model, opt, gen, x, x.sum(1, keepdim=True).sin()


def _train_with_spike(opt_cls, feed_loss, spike_at=60, steps=90, **kwargs):
    model, opt, gen, x, target = _regression(opt_cls, **kwargs)
    for step in range(steps):
        idx = torch.randint(512, (32,), generator=gen)
        loss = torch.nn.functional.mse_loss(model(x[idx]), target[idx])
        opt.zero_grad()
        loss.backward()
        if spike_at <= step < spike_at + 3:
            for p in model.parameters():
                p.grad.mul_(1000)
            loss = loss * 1000
        if feed_loss:
            opt.step(loss=loss.detach())
        else:
            opt.step()
    return opt


@pytest.mark.parametrize("feed_loss", [True, False], ids=["loss", "grad-norm"])
def test_a_gradient_spike_is_detected_and_skipped(feed_loss):
    """Also through plain step(): trainers that never pass a loss still get repair."""
    opt = _train_with_spike(RefAdamWMiniSF, feed_loss, total_steps=90)
    stats = opt.stats()
    assert stats["skips"].item() == 3 and stats["skipped_steps"].item() == 3
    assert stats["flagged_steps"].item() <= 5
    assert stats["repairs"].item() == 0  # a passing spike is skipped, not pulled


def test_repair_off_detects_but_does_not_act():
    opt = _train_with_spike(RefAdamWMiniSF, True, total_steps=90, repair=False)
    stats = opt.stats()
    assert stats["flagged_steps"].item() >= 3
    assert stats["skips"].item() == 0 and stats["repairs"].item() == 0 and stats["skipped_steps"].item() == 0


def test_stats_report_the_controller_and_mirror_into_param_groups():
    opt = _train_with_spike(RefAdamWMiniSF, True, spike_at=1000, steps=30, total_steps=50, ref_alpha=0.05)
    stats = opt.stats()
    for key in ("steps", "skipped_steps", "lr", "effective_lr", "lam", "divergence_level", "repairs", "skips",
                "flagged_steps", "overfit", "controller_steps"):
        assert isinstance(stats[key], torch.Tensor) and stats[key].dim() == 0, key
    assert stats["lam"].item() == pytest.approx(0.05)  # step 30 of 50 is inside the (0.2, 0.8) window
    group = opt.param_groups[0]["stats"]
    for key in ("lam", "divergence_level", "repairs", "skips", "flagged_steps", "overfit"):
        assert group[key].item() == stats[key].item()
    assert stats["controller_steps"].item() == 30


def test_window_follows_max_steps_and_total_steps():
    weight = torch.nn.Parameter(torch.randn(4, 4))
    opt = RefAdamWMiniSF([weight], ref_alpha=0.1, ref_window=(0.5, 1.0))
    lams = []
    for _ in range(10):
        weight.grad = torch.randn(4, 4)
        opt.step(max_steps=10)
        lams.append(opt.stats()["lam"].item())
    assert opt.total_steps == 10
    assert lams == pytest.approx([0.0] * 4 + [0.1] * 6)


def test_no_total_steps_means_no_injection_and_one_warning(caplog):
    weight = torch.nn.Parameter(torch.randn(4, 4))
    opt = RefAdamWMiniSF([weight], ref_alpha=0.5)
    with caplog.at_level(logging.WARNING, logger="refadamw"):
        for _ in range(5):
            weight.grad = torch.randn(4, 4)
            opt.step()
    assert opt.stats()["lam"].item() == 0.0
    assert sum("total_steps" in r.getMessage() for r in caplog.records) == 1


def test_overfit_suspends_injection():
    weight = torch.nn.Parameter(torch.randn(4, 4))
    opt = RefAdamWMiniSF([weight], ref_alpha=0.1, ref_window=(0.0, 1.0), total_steps=100)
    for step, val in enumerate([1.0, 1.1, 1.2, 1.3]):
        weight.grad = torch.randn(4, 4)
        opt.observe(val_loss=val)
        opt.step()
    assert opt.stats()["overfit"].item() == 1.0 and opt.stats()["lam"].item() == 0.0


def test_controller_state_round_trips_through_state_dict():
    a, b = _pair()
    first = RefAdamWMiniSF(a.parameters(), total_steps=60, ref_alpha=0.1)
    for step in range(30):
        first.zero_grad()
        loss = _loss(a, step)
        loss.backward()
        first.step(loss=loss.detach(), val_loss=loss.detach())
    buffer = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    b.load_state_dict(saved["model"])
    second = RefAdamWMiniSF(b.parameters())  # T and ref_alpha come back from the checkpoint
    second.load_state_dict(saved["opt"])
    assert second.total_steps == 60
    for step in range(30, 60):
        for model, opt in ((a, first), (b, second)):
            opt.zero_grad()
            loss = _loss(model, step) * (50 if step == 45 else 1)
            loss.backward()
            opt.step(loss=loss.detach(), val_loss=loss.detach())
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    for key, value in first.stats().items():
        assert torch.equal(value, second.stats()[key]), key


def test_ref_max_steps_is_an_alias_of_total_steps():
    assert RefAdamWMiniSF(torch.nn.Linear(2, 2).parameters(), ref_max_steps=100).total_steps == 100
    with pytest.raises(ValueError, match="disagree"):
        RefAdamWMiniSF(torch.nn.Linear(2, 2).parameters(), total_steps=10, ref_max_steps=100)


# -- spikes as trainers deliver them: clipped, accumulated, loss-scaled --------------------------------

def _trainer_loop(opt_cls=RefAdamWMiniSF, *, steps=90, spike_at=(60, 61, 62), clip=1.0, accumulate=1,
                  loss_scale=lambda step: 1.0, drop=(), **kwargs):
    """A trainer's loop: the spike comes from the batch (the loss ×1000), the gradients are accumulated
    over ``accumulate`` micro-batches, optionally loss-scaled (an fp16 scaler: unscaled before
    clipping), and clipped to norm ``clip`` before step(). Steps in ``drop`` are left out entirely."""
    model, opt, gen, x, target = _regression(opt_cls, **kwargs)
    for step in range(steps):
        batches = [torch.randint(512, (32,), generator=gen) for _ in range(accumulate)]
        if step in drop:
            continue
        opt.zero_grad()
        scale = loss_scale(step)
        for idx in batches:
            loss = torch.nn.functional.mse_loss(model(x[idx]), target[idx]) / accumulate
            (loss * (1000.0 if step in spike_at else 1.0) * scale).backward()
        if scale != 1.0:
            for p in model.parameters():
                p.grad.div_(scale)  # GradScaler.unscale_
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return model, opt


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_clipped_spike_is_still_flagged_and_skipped(accumulate):
    """Trainers clip to norm 1 before step(); the controller reads the norm backward produced."""
    _, opt = _trainer_loop(accumulate=accumulate, total_steps=90)
    stats = opt.stats()
    assert (stats["flagged_steps"].item(), stats["skips"].item()) == (3, 3)


def test_a_loss_scale_that_doubles_is_no_spike_but_a_scaled_spike_is():
    """fp16 scalers: the hooks see S·g, S a power of two that grows and backs off."""
    scale = lambda step: 2.0 ** (16 if step < 30 else 17 if step < 75 else 15)
    _, opt = _trainer_loop(loss_scale=scale, total_steps=90)
    stats = opt.stats()
    assert (stats["flagged_steps"].item(), stats["skips"].item()) == (3, 3)
    _, clean = _trainer_loop(loss_scale=scale, spike_at=(), total_steps=90)
    assert clean.stats()["flagged_steps"].item() == 0


def test_a_skipped_spike_costs_exactly_the_batches_it_came_with():
    """Skipping leaves every buffer and the controller's clock as they were: the run is bit-identical
    to one that never saw those batches."""
    spiked, opt = _trainer_loop(clip=None, total_steps=90, ref_alpha=0.05)
    dropped, _ = _trainer_loop(clip=None, spike_at=(), drop=(60, 61, 62), total_steps=90, ref_alpha=0.05)
    assert opt.stats()["skips"].item() == 3
    for a, b in zip(spiked.parameters(), dropped.parameters()):
        assert torch.equal(a, b)


def test_observe_grad_norm_feeds_the_next_step_only():
    _, opt = _trainer_loop(spike_at=(), steps=40, total_steps=90)
    weight = next(iter(opt.param_groups[0]["params"]))
    weight.grad = torch.zeros_like(weight)
    opt.observe(grad_norm=torch.tensor(1e6))  # a custom loop's own measurement
    opt.step()
    assert opt.stats()["skips"].item() == 1
    opt.step()  # the fed value is used once: this step reads the gradients again
    assert opt.stats()["skips"].item() == 1
    with pytest.raises(ValueError):
        opt.observe(grad_norm=torch.ones(2))


def test_copies_watch_their_own_parameters():
    import copy
    import pickle

    model = torch.nn.Linear(4, 4)
    opt = RefAdamWMiniSF(model.parameters(), total_steps=10)
    for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        params = other.param_groups[0]["params"]
        (params[0].sum() * 0 + params[0].pow(2).sum()).backward()
        assert set(other.backward_norms.recorded()) == {params[0]} and not opt.backward_norms.recorded()
        assert "backward_norms" not in other.__getstate__()
    model.weight.pow(2).sum().backward()
    assert set(opt.backward_norms.recorded()) == {model.weight}
    opt.zero_grad()
    assert not opt.backward_norms.recorded()
    added = torch.nn.Parameter(torch.ones(3))
    opt.add_param_group({"params": [added]})
    added.sum().backward()
    assert added in opt.backward_norms.recorded()


def test_hf_trainer_with_its_default_clipping_flags_and_skips_a_spike(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")

    class Tokens(torch.utils.data.Dataset):
        def __init__(self):
            self.ids = torch.randint(0, 64, (512, 16), generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    class SpikedTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            return loss * 1000 if self.state.global_step in (30, 31, 32) else loss  # a bad batch

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    opt = RefAdamWMiniSF(model.parameters(), total_steps=45)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=45, per_device_train_batch_size=8,
                                          gradient_accumulation_steps=2, save_strategy="no", report_to=[],
                                          logging_steps=100, use_cpu=True, disable_tqdm=True)
    assert args.max_grad_norm == 1.0
    SpikedTrainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, None)).train()
    stats = opt.stats()
    assert (stats["flagged_steps"].item(), stats["skips"].item()) == (3, 3)


def _ddp_spike_body(rank, world, out):
    """A bad batch on rank 0 only, clipped after DDP's all-reduce: every rank must skip the same steps."""
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)))
    opt = RefAdamWMiniSF(model.parameters(), lr=1e-2, total_steps=60)
    gen = torch.Generator().manual_seed(10 + rank)  # each rank its own data
    x = torch.randn(256, 8, generator=gen)
    target = x.sum(1, keepdim=True).sin()
    skips = []
    for step in range(60):
        idx = torch.randint(256, (32,), generator=gen)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[idx]), target[idx])
        (loss * (1000.0 if rank == 0 and 40 <= step < 43 else 1.0)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        skips.append(int(opt.stats()["skips"]))
    return {"skips": skips, "weights": [p.detach().clone() for p in model.parameters()]}


def test_ddp_ranks_skip_the_same_clipped_spike(tmp_path):
    from .test_distributed import launch

    ranks = launch(_ddp_spike_body, tmp_path)
    assert ranks[0]["skips"] == ranks[1]["skips"] and ranks[0]["skips"][-1] == 3
    for a, b in zip(ranks[0]["weights"], ranks[1]["weights"]):
        assert torch.equal(a, b)


# -- the controller is composed in: AdamWMiniSF(controller=...) is RefAdamWMiniSF ------------------

def _spiky_run(opt, model, steps=30):
    gen = torch.Generator().manual_seed(3)
    for t in range(steps):
        opt.zero_grad()
        x = torch.randn(16, 8, generator=gen) * (100.0 if t == 25 else 1.0)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step(loss=loss.detach())
    return [p.detach().clone() for p in model.parameters()]


def test_a_composed_ref_controller_is_ref_adamw_mini_sf():
    from refadamw.controller import RefController

    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    ref = RefAdamWMiniSF(a.parameters(), total_steps=30, fused=False)
    composed = AdamWMiniSF(b.parameters(), fused=False, controller=RefController(0.05, (0.2, 0.8), 30, True))
    for x, y in zip(_spiky_run(ref, a), _spiky_run(composed, b)):
        assert torch.equal(x, y)
    assert ref.stats()["skips"].item() == composed.stats()["skips"].item() == 1
    assert sorted(ref.state_dict()) == sorted(composed.state_dict()) == ["param_groups", "ref_config",
                                                                          "ref_controller", "state"]


def test_a_load_keeps_the_controllers_tunables():
    from refadamw.controller import RefController

    model = torch.nn.Linear(8, 4)
    opt = AdamWMiniSF(model.parameters(), controller=RefController(0.1, (0.0, 1.0), 30, True, skip_level=3))
    _spiky_run(opt, model, steps=3)
    saved = opt.state_dict()
    opt.load_state_dict(saved)
    assert opt.controller.skip_level == 3 and opt.controller.ref_alpha == 0.1 and opt.total_steps == 30


def test_the_seed_names_are_aliases():
    params = list(torch.nn.Linear(4, 2).parameters())
    assert AdamWMiniSF(params, schedulefree_alpha=0.2).defaults["norm_ema_alpha"] == 0.2
    assert "schedulefree_alpha" not in AdamWMiniSF(params, schedulefree_alpha=0.2).defaults
    assert RefAdamWMiniSF(params, ref_max_steps=40).total_steps == 40
    with pytest.raises(ValueError, match="disagree"):
        AdamWMiniSF(params, norm_ema_alpha=0.3, schedulefree_alpha=0.2)
    with pytest.raises(ValueError, match="disagree"):
        RefAdamWMiniSF(params, total_steps=30, ref_max_steps=40)
    opt = AdamWMiniSF(params)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "schedulefree_alpha": 0.3})
    assert opt.param_groups[1]["norm_ema_alpha"] == 0.3 and "schedulefree_alpha" not in opt.param_groups[1]


def test_without_a_controller_signals_are_refused():
    opt = AdamWMiniSF(torch.nn.Linear(4, 2).parameters())
    assert opt.controller is None and opt.backward_norms is None and opt.total_steps is None
    with pytest.raises(TypeError, match="has no controller"):
        opt.observe(loss=1.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'val_loss'"):
        opt.step(val_loss=1.0)
