"""Multi-tensor update: the algorithm of :mod:`refadamw.kernels` with ``torch._foreach_*``.

The path from :func:`refadamw.kernels.update`: :func:`multi_tensor_update` computes each bucket's
per-tensor scalars, calls the CPU kernel (:mod:`refadamw.kernels.native`) for the tensors it takes,
and :func:`_update_chunk` for the others, a chunk at a time; that calls the one elementwise update,
:func:`refadamw.kernels.common.schedule_free_step`, or the compiled pass of :mod:`refadamw.kernels.fused`.

Tensors are bucketed by (device, compute dtype); per-tensor scalars (step, norm EMA, ``lr_max``,
``W``) are stacked into one vector per bucket so their arithmetic is a handful of small ops whatever
the tensor count, and the large tensors are updated in place.
"""

from __future__ import annotations

import operator

import torch

from ..auto_lr import step_size, update_norm_ema
from ..averaging import averaging_weight, offset_coefficients, ref_weight, warmup_factor
from ..lr_free import Observation
from ..partition import BlockLayout
from ..precision import Salt, rounding_keys, shift_key
from . import fused as fused_kernel
from . import native
from .common import (Control, Hyper, StepReport, buckets, buffer_offset, device_scalar, finite_grads, finite_squares,
                     denominators, gates, moments, needs_rounding, nonzero, schedule_free_step, store,
                     working_copy)


def multi_tensor_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict[str, torch.Tensor]],
    layouts: list[BlockLayout],
    hyper: Hyper,
    fresh: list[bool],
    norms: list[torch.Tensor] | None = None,
    control: Control | None = None,
    fused: bool = False,
    index_offsets: list[int] | None = None,
    cache: dict | None = None,
    lr_free: Observation | None = None,
) -> StepReport:
    """One step of a group's tensors (the algorithm: :mod:`refadamw.kernels`), a bucket at a time.

    Per bucket: the per-tensor scalars (:func:`_step_scalars`), then the CPU kernel for the tensors it
    takes and :func:`_update_chunk` for the others; a group wholly in the CPU kernel, with coefficients
    that do not depend on the norms, takes :func:`one_call_step` instead.

    ``fused``: run the elementwise part of Schedule-Free updates fused where the tensor allows it: the
    CPU multi-tensor kernel (:mod:`refadamw.kernels.native`), else one compiled pass per tensor
    (:mod:`refadamw.kernels.fused`). ``index_offsets``: where each (sharded) tensor starts in its whole
    tensor, for the rounding noise. ``cache``: a dict the caller keeps for this group while its tensors
    and their state stay the same; the buckets, the per-tensor scalar vectors and the kernel's plan live
    there (the states' scalars become views of those vectors). ``lr_free``: gets the lr-free terms, from
    the CPU kernel's pass for the tensors it takes, read before the update for the others."""
    index_offsets = [0] * len(params) if index_offsets is None else index_offsets
    plans = bucket_plans(params, grads, states, layouts, hyper.schedule_free and fused, cache)
    if (norms is None and control is None and not hyper.auto_lr and len(plans) == 1 and plans[0].native is not None
            and not plans[0].rest_idx and not any(fresh)):
        report = one_call_step(plans[0], params, grads, states, hyper, lr_free)
        if report is not None:
            return report
    if norms is None:
        vectors = bucket_norm_vectors(plans, grads)
    else:
        vectors = [torch.stack([norms[i] for i in plan.idx]) for plan in plans]
    finite, keep = gates(vectors, control)

    lrs, etas = [], []
    for plan, norm in zip(plans, vectors):
        device, dtype, n = plan.device, plan.dtype, len(plan.idx)
        bucket_keep = keep.to(device)
        ref = None if control is None else (control.lam.to(device), torch.where(finite, control.pull, 0.0).to(device))
        new, scalars, lr_t, eta = _step_scalars(plan, norm, hyper, bucket_keep, dtype, ref)
        rest = range(n)  # positions in the bucket that the multi-tensor ops update
        if plan.native is not None:
            # The CPU kernel, one call for the tensors it takes; False (nothing done): a gradient no longer fits it.
            ids = [plan.idx[j] for j in plan.native_idx]
            step, tensor_keys, *columns = _select(plan.native_idx, n, [new["step"], plan.vectors["rounding_key"],
                                                                        *plan.columns(hyper, scalars)])
            terms = None if lr_free is None else native.LrFreeTerms(lr_free.a, bucket_keep, lr_free.beta3)
            if plan.native.update([params[i] for i in ids], [grads[i] for i in ids], [fresh[i] for i in ids], columns,
                                  step, tensor_keys, terms):
                rest = plan.rest_idx
                if lr_free is not None:
                    lr_free.record(ids, *plan.native.lr_free_results())
        if rest:
            ids = [plan.idx[j] for j in rest]
            if lr_free is not None:
                lr_free.read(ids, [params[i] for i in ids], [grads[i] for i in ids])
            step, tensor_keys, *values = _select(rest, n, [new["step"], plan.vectors["rounding_key"],
                                                           *scalars.values()])
            rest_params, rest_grads, rest_states, rest_layouts = _pick(ids, params, grads, states, layouts)
            k = _per_tensor(rest_params, rest_states, [fresh[i] for i in ids], [index_offsets[i] for i in ids], hyper,
                            dtype, step, dict(zip(scalars, values)), tensor_keys, fused)
            # Large tensors in chunks, on every device: each chunk's temporaries (fp32 copies of low-precision
            # storage, the direction d) stay small, and on CPU they are reused step after step instead of
            # costing page faults.
            for part in _chunks(rest_params, CHUNK_NUMEL):
                _update_chunk(rest_params[part], rest_grads[part], rest_states[part], rest_layouts[part], hyper, dtype,
                              {name: v[part] for name, v in k.items()})
        plan.commit([states[i] for i in plan.idx], new, bucket_keep)
        lrs.append(lr_t.to(keep.device, torch.float32))
        etas.append(eta.to(keep.device, torch.float32))
    return StepReport(keep, torch.cat(lrs).mean(), torch.cat(etas).mean())


class BucketPlan:
    """One (device, compute dtype) bucket of a group: its tensors' indices, the per-tensor scalars as one
    vector each, and the CPU kernel's plan for the tensors it takes (``native_idx``, positions in ``idx``).

    With ``bind`` the states' scalar entries are replaced by views of the vectors, so a step updates the
    vectors in place and nothing is stacked or unbound; without it (no cache: a one-off call) the
    vectors are copies, written back into the states after the step.
    """

    def __init__(self, key, idx, states, scalar_keys, bind: bool):
        self.device, self.dtype = key
        self.idx = idx
        self.vectors = {k: torch.stack([s[k] for s in states]) for k in scalar_keys}
        self.bind = bind
        if bind:
            for k, vector in self.vectors.items():
                for s, view in zip(states, vector.unbind()):
                    s[k] = view
        self.held = [s["step"] for s in states] if bind else None  # a load or a conversion replaces every entry
        self.native = None
        self.native_idx: list[int] = []
        self.rest_idx: list[int] = list(range(len(idx)))

    def columns(self, h: Hyper, scalars: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The CPU kernel's coefficient columns (``native.COEFFICIENTS``): this step's ``scalars``, and
        ``weight_decay`` and ``eps`` as 0-d fp32 tensors on the bucket's device, made once per value."""
        key = (h.weight_decay, h.eps)
        if isinstance(h.weight_decay, torch.Tensor) or getattr(self, "_constants_key", None) != key:
            self._constants_key = key
            self._constants = {"weight_decay": device_scalar(h.weight_decay, self.device),
                               "eps": device_scalar(h.eps, self.device)}
        return [self._constants[name] if name in self._constants else scalars[name] for name in native.COEFFICIENTS]

    def holds(self, states) -> bool:
        """Whether ``states`` still hold exactly the tensors this plan was built on (no load, no conversion)."""
        return self.held is not None and len(states) == len(self.held) and all(
            map(operator.is_, map(operator.itemgetter("step"), states), self.held))

    def commit(self, states, new: dict[str, torch.Tensor], keep) -> None:
        """Write the per-tensor scalars of this step, keeping the old values on a skipped step."""
        for key, values in new.items():
            self.vectors[key].copy_(torch.where(keep, values, self.vectors[key]))
        if not self.bind:
            for key in new:
                torch._foreach_copy_([s[key] for s in states], list(self.vectors[key].unbind()))


def _scalar_keys(states) -> tuple[str, ...]:
    return tuple(k for k in ("step", "grad_norm_ema", "lr_max", "weight_sum", "rounding_key") if k in states[0])


def bucket_plans(params, grads, states, layouts, native_ok: bool, cache: dict | None) -> list[BucketPlan]:
    """The group's bucket plans, from ``cache`` when it still holds for these states, else built (and cached).

    Inside a caller's ``torch.compile`` the C kernel is not used (dynamo cannot trace a foreign call):
    the traced step takes the compiled pass, with plans of its own.
    """
    compiling = torch.compiler.is_compiling()
    native_ok = native_ok and not compiling
    slot = "compiled plans" if compiling else "plans"
    if cache is not None:
        plans = cache.get(slot)
        if plans is not None and all(p.holds([states[i] for i in p.idx]) for p in plans):
            return plans
    plans = []
    for key, idx in buckets(params).items():
        bucket_states = [states[i] for i in idx]
        plan = BucketPlan(key, idx, bucket_states, _scalar_keys(bucket_states), bind=cache is not None)
        if native_ok and key[0].type == "cpu" and key[1] == torch.float32 and native.available() \
                and native.library() is not None:
            buffer = "z_minus_y"
            chosen = [j for j, i in enumerate(idx)
                      if native.eligible(params[i], grads[i], states[i][buffer], states[i]["exp_avg_sq"], layouts[i])]
            if chosen:
                plan.native_idx = chosen
                taken = set(chosen)
                plan.rest_idx = [j for j in range(len(idx)) if j not in taken]
                lr_free_states = [states[idx[j]] for j in chosen] if "lr_free_anchor" in states[idx[0]] else None
                plan.native = native.Plan([params[idx[j]] for j in chosen],
                                          [states[idx[j]][buffer] for j in chosen],
                                          [states[idx[j]]["exp_avg_sq"] for j in chosen],
                                          [layouts[idx[j]] for j in chosen], lr_free_states)
        plans.append(plan)
    if cache is not None:
        cache[slot] = plans
    return plans


def bucket_norm_vectors(plans: list[BucketPlan], grads) -> list[torch.Tensor]:
    """Each bucket's gradient 2-norms as one vector, in its compute dtype: from the CPU kernel's block
    sums where it takes the tensor (the same read of ``g`` gives both), else ``torch._foreach_norm``."""
    vectors = []
    for plan in plans:
        sums = None
        if plan.native is not None:
            sums = plan.native.row_sums([grads[plan.idx[j]] for j in plan.native_idx])
        native_norms = None if sums is None else sums.sqrt().to(plan.dtype)
        rest = plan.rest_idx if sums is not None else range(len(plan.idx))
        if not rest:
            vectors.append(native_norms)
            continue
        rest_norms = torch.stack(torch._foreach_norm([grads[plan.idx[j]] for j in rest], dtype=plan.dtype))
        if native_norms is None:
            vectors.append(rest_norms)
            continue
        vector = torch.empty(len(plan.idx), dtype=plan.dtype, device=plan.device)
        vector[plan.native_idx] = native_norms
        vector[plan.rest_idx] = rest_norms
        vectors.append(vector)
    return vectors


def bucket_norms(plans: list[BucketPlan], params, grads) -> list[torch.Tensor]:
    """:func:`bucket_norm_vectors`, as one 0-d tensor per tensor of ``params``."""
    norms: list[torch.Tensor] = [None] * len(params)  # type: ignore[list-item]
    for plan, vector in zip(plans, bucket_norm_vectors(plans, grads)):
        for i, n in zip(plan.idx, vector.unbind()):
            norms[i] = n
    return norms


CHUNK_NUMEL = 1 << 18
"""The multi-tensor path runs in chunks of about this many elements (see multi_tensor_update)."""


def _chunks(params, max_numel: int | None):
    """Consecutive index ranges whose tensors hold at most ``max_numel`` elements (one at least)."""
    if max_numel is None:
        yield slice(0, len(params))
        return
    begin, total = 0, 0
    for i, p in enumerate(params):
        if total and total + p.numel() > max_numel:
            yield slice(begin, i)
            begin, total = i, 0
        total += p.numel()
    yield slice(begin, len(params))


def _rounding_keys(tensor_keys, step, salt: Salt, targets, dtype, offsets) -> list[torch.Tensor | None]:
    """Per-tensor stochastic-rounding keys for one buffer, computed only if some target is bf16/fp16.

    ``tensor_keys``: the tensors' ``rounding_key`` state as one vector; ``offsets[i]``: the global index
    of ``targets[i]``'s first element (nonzero only for shards).
    """
    if not any(needs_rounding(t, dtype) for t in targets):
        return [None] * len(targets)
    keys = rounding_keys(tensor_keys, step, salt).unbind()
    return [shift_key(key, offset) for key, offset in zip(keys, offsets)]


def _step_scalars(plan: BucketPlan, norm, h: Hyper, keep, dtype, ref):
    """This step's per-tensor scalars as vectors: ``(new, scalars, lr_t, eta)``, ``new`` the state to
    commit (the norm EMA only when ``norm`` is given), ``scalars`` the kernels' coefficients."""
    keep_f = keep.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=keep.device)
    old = plan.vectors
    new = {"step": old["step"] + keep.to(old["step"].dtype)}
    step = new["step"]
    step_f = step.to(dtype)
    lr_t = h.lr * warmup_factor(step_f, h.warmup_steps)
    eta = lr_t
    if norm is not None:
        ema = new["grad_norm_ema"] = update_norm_ema(old["grad_norm_ema"], norm, step == 1, h.norm_ema_alpha)
        if h.auto_lr:
            eta = step_size(lr_t, ema, norm, h.min_lr, h.max_lr)
    eta = torch.where(keep, eta, zero)
    scalars = {
        "v_weight": (1 - h.beta2) * keep_f,
        "sqrt_bias2": (1 - h.beta2 ** step_f.clamp(min=1)).sqrt(),
    }
    if h.schedule_free:
        c, new["lr_max"], new["weight_sum"] = averaging_weight(lr_t, old["lr_max"], old["weight_sum"], step,
                                                               h.averaging_power)
        rho = None
        if ref is not None:
            lam, rho = ref
            c, rho = ref_weight(c, lam.to(dtype)), rho.to(dtype)
        c = torch.where(keep, c, zero)
        scalars.update(offset_coefficients(eta, c, h.beta1, rho)._asdict())
    else:
        scalars.update(y_step=-eta, m_weight=(1 - h.beta1) * keep_f, bias1=1 - h.beta1 ** step_f.clamp(min=1))
    return new, scalars, lr_t, eta


def one_call_step(plan: BucketPlan, params, grads, states, h: Hyper, lr_free: Observation | None = None
                  ) -> StepReport | None:
    """A group that is one bucket, all of it in the CPU kernel, with coefficients that do not depend on
    the norms (no auto-lr, no controller, no fresh state): block sums, hygiene gate and update in one
    call (:meth:`refadamw.kernels.native.Plan.step`). The scalars are computed as for an applied step
    and committed only if it was. None (nothing done) when a tensor does not fit the kernel this step."""
    device, dtype = plan.device, plan.dtype
    applied = torch.ones((), dtype=torch.bool, device=device)
    new, scalars, lr_t, eta = _step_scalars(plan, None, h, applied, dtype, None)
    terms = None if lr_free is None else native.LrFreeTerms(lr_free.a, applied, lr_free.beta3)
    sums = plan.native.step(params, grads, plan.columns(h, scalars), new["step"], plan.vectors["rounding_key"], terms)
    if sums is None:
        return None
    if lr_free is not None:
        lr_free.record(list(range(len(params))), *plan.native.lr_free_results())
    norm = sums.sqrt().to(dtype)
    keep = norm.isfinite().all()  # the kernel's own gate, on the same sums
    old = plan.vectors
    new["grad_norm_ema"] = update_norm_ema(old["grad_norm_ema"], norm, new["step"] == 1, h.norm_ema_alpha)
    plan.commit(states, new, keep)
    eta = torch.where(keep, eta, 0.0)
    return StepReport(keep, lr_t.float().mean(), eta.float().mean())


def _select(positions: list[int], n: int, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The entries at ``positions`` of per-tensor ``vectors`` of a bucket of ``n`` tensors (a 0-d tensor holds
    for every tensor and stays as it is); all of them: the vectors themselves."""
    if len(positions) == n:
        return vectors
    sel = torch.tensor(positions, dtype=torch.int64, device=vectors[0].device)
    return [v[sel] if v.dim() else v for v in vectors]


def _per_tensor(params, states, fresh, offsets, h: Hyper, dtype, step, scalars, tensor_keys, fused
                ) -> dict[str, list]:
    """The per-tensor arguments of :func:`_update_chunk`, as lists: this step's ``scalars`` (vectors, or 0-d
    for all), the compiled pass's coefficient row ``coef`` (only where it may run), ``fresh``, and the
    rounding keys of the three writes, computed once for all the chunks."""
    n = len(params)
    k = {name: list(v.unbind()) if v.dim() else [v] * n for name, v in scalars.items()}
    if fused and h.schedule_free and dtype == torch.float32 and fused_kernel.available():
        values = {"weight_decay": device_scalar(h.weight_decay, step.device), **scalars}
        k["coef"] = list(torch.stack([values[name].float().expand(n) for name in fused_kernel.COEFFICIENTS],
                                     dim=1).unbind())  # (n, 5), in the order of fused.COEFFICIENTS
    k["fresh"] = fresh
    k["key_param"] = _rounding_keys(tensor_keys, step, Salt.PARAM, params, dtype, offsets)
    vs = [s["exp_avg_sq"] for s in states]
    v_offsets = [buffer_offset(o, p, v) for o, p, v in zip(offsets, params, vs)]
    k["key_v"] = _rounding_keys(tensor_keys, step, Salt.EXP_AVG_SQ, vs, dtype, v_offsets)
    buffer, salt = ("z_minus_y", Salt.Z_MINUS_Y) if h.schedule_free else ("exp_avg", Salt.EXP_AVG)
    k["key_buffer"] = _rounding_keys(tensor_keys, step, salt, [s[buffer] for s in states], dtype, offsets)
    return k


def _update_chunk(params, grads, states, layouts, h: Hyper, dtype, k: dict[str, list]) -> None:
    """One chunk of a bucket's tensors that the CPU kernel did not take, updated in place.

    ``k``: their :func:`_per_tensor` arguments. With ``k["coef"]`` each tensor that fits it takes the
    compiled pass (:func:`refadamw.kernels.fused.fused_pass`) for the elementwise work, the block-sized
    work (mean squares, ``v``, denominators) staying here; the others take
    :func:`refadamw.kernels.common.schedule_free_step` over the list (or, with ``schedule_free=False``,
    the AdamW-mini step).
    """
    if "coef" in k:
        fits = [fused_kernel.eligible(p, g, s["z_minus_y"]) for p, g, s in zip(params, grads, states)]
        if any(fits):
            take = [i for i, f in enumerate(fits) if f]
            c_params, c_grads, c_states, c_layouts = _pick(take, params, grads, states, layouts)
            c_k = {name: _pick(take, v)[0] for name, v in k.items()}
            # The gradients are read as they are: a non-finite block mean square only matters on a skipped
            # step, whose v weight is 0, so it is set to 0 to keep v exact; the pass reads NaN/inf g as 0.
            squares = [torch.nan_to_num_(lay.mean_square(lay.blocked(g), dtype), nan=0.0,
                                         posinf=torch.finfo(dtype).max) for lay, g in zip(c_layouts, c_grads)]
            vs = moments(c_states, "exp_avg_sq", squares, c_k["v_weight"], c_k["fresh"], dtype)
            denoms = denominators(vs, c_k["sqrt_bias2"], h.eps)
            for i, (p, g, s, dn, lay) in enumerate(zip(c_params, c_grads, c_states, denoms, c_layouts)):
                args = (lay.grid(p), lay.grid(g), lay.grid(s["z_minus_y"]), lay.grid_v(dn, p.shape),
                        c_k["coef"][i], c_k["key_param"][i], c_k["key_buffer"][i])
                if not fused_kernel.fused_pass(*args):
                    fused_kernel.sf_pass(*args)  # compiling failed: the same arithmetic, uncompiled, this once
            for s, v, key in zip(c_states, vs, c_k["key_v"]):
                store(s["exp_avg_sq"], v, key)
            left = [i for i, f in enumerate(fits) if not f]
            if not left:
                return
            params, grads, states, layouts = _pick(left, params, grads, states, layouts)
            k = {name: _pick(left, v)[0] for name, v in k.items()}
    grads = finite_grads([g.to(dtype) for g in grads])
    blocked_grads = [lay.blocked(g) for lay, g in zip(layouts, grads)]
    squares = finite_squares([lay.mean_square(bg) for lay, bg in zip(layouts, blocked_grads)])
    vs = moments(states, "exp_avg_sq", squares, k["v_weight"], k["fresh"], dtype)
    denoms = denominators(vs, k["sqrt_bias2"], h.eps)
    denoms = [lay.broadcastable(dn, p.dim()) for lay, dn, p in zip(layouts, denoms, params)]

    ys = [working_copy(p, dtype) for p in params]
    blocked_ys = [lay.blocked(y) for lay, y in zip(layouts, ys)]
    if h.schedule_free:
        offsets = [working_copy(s["z_minus_y"], dtype) for s in states]
        # blocked_grads are our own finite copies: the direction is built in them, no new buffer
        schedule_free_step(blocked_ys, blocked_grads, [lay.blocked(o) for lay, o in zip(layouts, offsets)], denoms,
                           h.weight_decay, k["y_offset"], k["y_step"], k["offset_decay"], k["offset_step"])
        for s, offset, key in zip(states, offsets, k["key_buffer"]):
            store(s["z_minus_y"], offset, key)
    else:
        ms = moments(states, "exp_avg", grads, k["m_weight"], k["fresh"], dtype)
        ds = torch._foreach_div([lay.blocked(m) for lay, m in zip(layouts, ms)], k["bias1"])
        torch._foreach_div_(ds, denoms)
        if nonzero(h.weight_decay):
            if isinstance(h.weight_decay, torch.Tensor):  # alpha= would read it on the host
                torch._foreach_add_(ds, torch._foreach_mul(blocked_ys, h.weight_decay.to(dtype)))
            else:
                torch._foreach_add_(ds, blocked_ys, alpha=h.weight_decay)
        torch._foreach_addcmul_(blocked_ys, ds, k["y_step"])
        for s, m, key in zip(states, ms, k["key_buffer"]):
            store(s["exp_avg"], m, key)

    for p, y, key in zip(params, ys, k["key_param"]):
        store(p, y, key)
    for s, v, key in zip(states, vs, k["key_v"]):
        store(s["exp_avg_sq"], v, key)


def _pick(idx: list[int], *lists):
    return tuple([xs[i] for i in idx] for xs in lists)
