"""Wrote checkpoint_0.1.0.pt with the code of commit 386e9e1, before the structure change:
``PYTHONPATH=<checkout of 386e9e1>/src python tests/data/make_checkpoint_0.1.0.py tests/data/checkpoint_0.1.0.pt``.
tests/test_checkpoint.py imports model() and grads() from here."""

import copy
import sys

import torch

import refadamw


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(torch.bfloat16)


def grads(m, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in m.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def main(path):
    out = {}
    for cls in (refadamw.AdamWMiniSF, refadamw.RefAdamWMiniSF):
        m = model()
        kw = dict(total_steps=8) if cls is refadamw.RefAdamWMiniSF else {}
        opt = cls([{"params": [m[0].weight, m[2].weight], "weight_decay": 0.1}, {"params": [m[0].bias, m[2].bias]}],
                  lr=1e-2, warmup_steps=2, fused=False, auto_lr=True, schedulefree_alpha=0.1, state_dtype="fp32", **kw)
        for s in range(3):
            grads(m, s)
            opt.step()
        # state_dict() holds the live tensors: copy it before stepping on
        saved = {"model": {k: v.clone() for k, v in m.state_dict().items()},
                 "optimizer": copy.deepcopy(opt.state_dict())}
        for s in range(3, 6):
            grads(m, s)
            opt.step()
        opt.eval()
        saved["after"] = [p.detach().clone() for p in m.parameters()]
        out[cls.__name__] = saved
    torch.save(out, path)


if __name__ == "__main__":
    main(sys.argv[1])
