"""A float64 reference of the seed's algorithm, written from SPEC.md §2 only.

It deliberately shares no code with ``refadamw.compat``: plain float64 tensors
and Python floats, one function per rule of the text. Two documented
departures, which SPEC §5 asks of legacy mode: no prints, and where the seed
raised IndexError while counting improvements, counting stops at the start of
the history (``raise_index_error=True`` reproduces the seed's crash).
"""

from __future__ import annotations

import torch


class SeedReference:
    """SPEC §2 ``RefAdamWminiScheduleFree`` on float64 copies of the parameters."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, min_lr=1e-6,
                 max_lr=1e-2, schedulefree_alpha=0.05, ref_alpha=0.5, ref_max_steps=None,
                 raise_index_error=False):
        self.p = [q.detach().to(torch.float64).clone() for q in params]
        self.lr, self.b1, self.b2, self.eps, self.wd = lr, betas[0], betas[1], eps, weight_decay
        self.min_lr, self.max_lr, self.alpha = min_lr, max_lr, schedulefree_alpha
        self.ref_alpha, self.ref_max_steps = ref_alpha, ref_max_steps
        self.raise_index_error = raise_index_error
        self.m = [None] * len(self.p)
        self.v = [None] * len(self.p)
        self.ema = [None] * len(self.p)
        self.t = 0                      # one global step counter
        self.vals = []                  # last 20 val_loss values
        self.skip = False
        self.counter = 0
        self.prev_loss = None
        self.divergent = 0
        self.injections = []            # (t, λ) of every injection, for the tests
        self.etas = []                  # every step size η, for the tests

    def step(self, grads, loss=None, max_steps=None, val_loss=None):
        self.t += 1
        # 1. validation history and overfit/skip bookkeeping
        if val_loss is not None:
            self._validation(float(val_loss), max_steps)
        # 2. divergence level from loss
        level = None
        if loss is not None:
            level = self._level(float(loss))
        # 3. the parameter update
        for i, g in enumerate(grads):
            if g is not None:
                self._update(i, g.to(torch.float64))
        # 4. the injection, using the updated parameters
        if loss is not None:
            T = max_steps if max_steps is not None else self.ref_max_steps
            progress = 0.5 if T is None else self.t / T
            if 0.2 <= progress <= 0.8 and not self.skip:
                if level == 3 or self.divergent >= 3:
                    lam = 1.0
                elif level == 2 or self.divergent >= 2:
                    lam = 0.8
                elif level == 1 or self.divergent >= 1:
                    lam = 0.6
                else:
                    lam = self.ref_alpha
                self.injections.append((self.t, lam))
                for i in range(len(self.p)):
                    if self.m[i] is not None:
                        self.m[i] = (1 - lam) * self.m[i] + lam * self.p[i]

    def _update(self, i, g):
        if self.m[i] is None:
            self.m[i] = torch.zeros_like(g)
            self.v[i] = torch.zeros_like(g)
        self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
        self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
        n = float(torch.sqrt((g * g).sum()))
        self.ema[i] = n if self.ema[i] is None else (1 - self.alpha) * self.ema[i] + self.alpha * n
        eta = min(max(self.lr * self.ema[i] / (n + 1e-12), self.min_lr), self.max_lr)
        self.etas.append(eta)
        self.p[i] = self.p[i] - self.wd * eta * self.p[i]
        self.p[i] = self.p[i] - eta * self.m[i] / (torch.sqrt(self.v[i]) + self.eps)

    def _level(self, loss):
        level = 0
        if self.prev_loss is not None:
            r = loss / (self.prev_loss + 1e-8)
            if r > 2.0:
                level = 3
            elif r > 1.5:
                level = 2
            elif r > 1.2:
                level = 1
        self.divergent = self.divergent + 1 if level > 0 else 0
        self.prev_loss = loss
        return level

    def _validation(self, val, max_steps):
        self.vals = (self.vals + [val])[-20:]
        h = self.vals
        M = max_steps if max_steps is not None else 1000
        K = min(20, max(10, int(1e-4 * M)))
        if len(h) >= 4 and h[-1] > h[-2] > h[-3] > h[-4]:
            self.skip = True
        # improving: the newest value lower than the one before, K times in a row
        count = 0
        for k in range(1, K + 1):
            if k + 1 > len(h):
                if self.raise_index_error:
                    raise IndexError("the seed reads before the start of the val_loss history")
                break
            if h[-k] < h[-k - 1]:
                count += 1
            else:
                break
        improving = count == K
        if self.skip:
            self.counter = self.counter + 1 if improving else 0
            if self.counter >= K:
                self.skip = False
                self.counter = 0
