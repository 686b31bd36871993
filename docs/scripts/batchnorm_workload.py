"""BatchNorm workload (docs/integrations.md): val MSE at x, statistics as gathered (at y) vs recomputed at x.

MLP 8 → 64 (BN, ReLU) → 64 (BN, ReLU) → 1 on t = Σ sin(x_i) + 0.01·noise, RefAdamWMiniSF (defaults but lr),
batch 64, fresh batches every step; recomputed with refadamw.recompute_bn_stats over the first n training batches.
Run: LR=1e-2 PYTHONPATH=src python docs/scripts/batchnorm_workload.py 0 1 2
"""
import os, sys, torch
from refadamw import RefAdamWMiniSF, recompute_bn_stats

STEPS, LR, BATCH = int(os.environ.get("STEPS", 800)), float(os.environ.get("LR", 1e-2)), 64

def run(seed):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(STEPS * BATCH + 2048, 8, generator=g)
    ys = xs.sin().sum(1, keepdim=True) + 0.01 * torch.randn(len(xs), 1, generator=g)
    tx, ty, vx, vy = xs[:-2048], ys[:-2048], xs[-2048:], ys[-2048:]
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = RefAdamWMiniSF(model.parameters(), lr=LR, total_steps=STEPS)
    for t in range(STEPS):
        loss = torch.nn.functional.mse_loss(model(tx[t * BATCH:(t + 1) * BATCH]), ty[t * BATCH:(t + 1) * BATCH])
        loss.backward(); opt.step(loss=loss.detach()); opt.zero_grad()
    def val():
        model.eval()
        with torch.no_grad():
            out = torch.nn.functional.mse_loss(model(vx), vy).item()
        model.train()
        return out
    opt.eval()
    out = {"gathered": val()}
    batches = [(tx[i * BATCH:(i + 1) * BATCH],) for i in range(256)]
    for n in (8, 32, 128, 256):
        recompute_bn_stats(model, batches[:n]); out[n] = val()
    return out

for seed in map(int, sys.argv[1:]):
    print(f"lr={LR} steps={STEPS} seed={seed}", {k: f"{v:.5f}" for k, v in run(seed).items()}, flush=True)
