"""step() must never synchronize with the host (no .item(), bool(t), float(t))."""

import contextlib

import pytest
import torch

from refadamw import AdamWMiniSF, RefAdamWMiniSF, precision
from refadamw.kernels import fused


@contextlib.contextmanager
def host_syncs_forbidden():
    def forbid(name):
        def raiser(*args, **kwargs):
            raise AssertionError(f"Tensor.{name} was called inside step(): a host sync")
        return raiser

    names = ["item", "__bool__", "__float__", "__int__", "__index__", "tolist"]
    saved = {n: getattr(torch.Tensor, n) for n in names}
    try:
        for n in names:
            setattr(torch.Tensor, n, forbid(n))
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def test_the_guard_itself_catches_a_sync():
    with pytest.raises(AssertionError, match="host sync"), host_syncs_forbidden():
        bool(torch.tensor(1.0) > 0)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("schedule_free", [True, False])
@pytest.mark.parametrize("state_dtype", ["auto", "bf16", "fp16"])
@pytest.mark.parametrize("cls", [AdamWMiniSF, RefAdamWMiniSF])
def test_step_never_syncs(device, foreach, schedule_free, state_dtype, cls):
    model = torch.nn.Sequential(torch.nn.Linear(8, 512), torch.nn.ReLU(), torch.nn.Linear(512, 3)).to(device)
    opt = cls(
        [{"params": model[0].parameters(), "lr": torch.tensor(1e-2)}, {"params": model[2].parameters(), "lr": None}],
        foreach=foreach, schedule_free=schedule_free, warmup_steps=2, auto_lr=True, state_dtype=state_dtype,
    )
    x = torch.randn(16, 8, device=device)
    # Compiling the rounding kernel traces it, and tracing reads tensor values: compile before the guard,
    # so the guard checks what every later step runs.
    # The fused update compiles on the first step (fresh state) and once more on the second.
    for dtype in precision.LOW_PRECISION:
        precision.stochastic_round(torch.randn(8, device=device), dtype, torch.tensor(1, dtype=torch.int32, device=device))
    for step in range(5):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        if step == 3:
            model[2].weight.grad[0, 0] = float("nan")  # hygiene skip, decided on the device
        with host_syncs_forbidden() if step >= 2 else contextlib.nullcontext():
            if cls is RefAdamWMiniSF:
                opt.step(loss=loss.detach(), val_loss=loss.detach())
            else:
                opt.step()
    assert opt.stats()["skipped_steps"].item() == 1
    with host_syncs_forbidden():  # the mode switch rounds stochastically too
        opt.eval()
        opt.train()
    assert not precision._compile_failed and not fused._compile_failed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("loss_as", ["tensor", "float"])
def test_steady_state_steps_make_no_synchronizing_cuda_call(loss_as):
    """CUDA's own sync detector, after warm-up (compiling may sync): catches host-to-device copies
    from pageable memory too, such as ``torch.tensor(x, device="cuda")``, which the guard above cannot."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 512), torch.nn.ReLU(), torch.nn.Linear(512, 3)).cuda()
    opt = RefAdamWMiniSF([{"params": model[0].parameters(), "lr": torch.tensor(1e-2)}, {"params": model[2].parameters()}],
                         warmup_steps=2, auto_lr=True, total_steps=100)
    x = torch.randn(16, 8, device="cuda")
    for step in range(12):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        signal = loss.detach() if loss_as == "tensor" else 1.0 + step
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if step >= 8 else "default")
        try:
            opt.step(loss=signal, val_loss=signal)
        finally:
            torch.cuda.set_sync_debug_mode("default")


PATHS = {"per-tensor": dict(foreach=False), "multi-tensor": dict(fused=False), "fused": {}, "compiled": {}}


@pytest.mark.parametrize("path", PATHS)
def test_a_tensor_weight_decay_never_syncs_and_decays_like_its_float(path, monkeypatch):
    if path == "compiled":
        from refadamw.kernels import native

        monkeypatch.setattr(native, "available", lambda: False)
    runs = []
    for weight_decay in (torch.tensor(0.1), 0.1):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
        opt = AdamWMiniSF(model.parameters(), lr=1e-2, weight_decay=weight_decay, warmup_steps=1, **PATHS[path])
        for step in range(4):
            opt.zero_grad()
            model(torch.randn(16, 8)).pow(2).mean().backward()
            with host_syncs_forbidden() if step >= 2 else contextlib.nullcontext():  # step 1 compiles
                opt.step()
        runs.append(model)
    for p, q in zip(*(m.parameters() for m in runs)):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls", [AdamWMiniSF, RefAdamWMiniSF])
def test_a_fused_backward_pass_never_syncs(cls):
    """The per-parameter steps run inside backward; with a controller, its spike test and the decision
    at the end of the step are tensor arithmetic too."""
    from refadamw import fused_backward

    model = torch.nn.Sequential(torch.nn.Linear(8, 512), torch.nn.ReLU(), torch.nn.Linear(512, 3))
    opt = cls(model.parameters(), lr=None, warmup_steps=2, state_dtype="bf16", fused_back_pass=True)
    fused_backward(model, opt, max_grad_norm=1.0)
    x = torch.randn(16, 8)
    for dtype in precision.LOW_PRECISION:
        precision.stochastic_round(torch.randn(8), dtype, torch.tensor(1, dtype=torch.int32))
    for step in range(5):
        loss = model(x).pow(2).mean()
        with host_syncs_forbidden() if step >= 2 else contextlib.nullcontext():
            loss.backward()
            opt.step(**({"loss": loss.detach()} if cls is RefAdamWMiniSF else {}))
    assert opt.stats()["steps"].item() == 5
