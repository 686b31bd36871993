"""Per-parameter second-moment layouts (refadamw.partition.parse_spec) on every kernel path,
against the float64 spec reference, and the layouts param_groups reads off real HF models."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import refadamw
from refadamw import AdamWMiniSF
from refadamw.partition import BlockLayout, block_layout, parse_spec

from .spec_reference import SpecHyper, SpecParam, spec_step

STEPS = 4
PATHS = {"reference": dict(foreach=False), "foreach": dict(foreach=True, fused=False),
         "fused": dict(foreach=True, fused=True)}


@pytest.mark.parametrize(
    "shape, spec, v_shape",
    [
        ((8, 12), "columns", (12,)),  # Conv1D (in, out): one block per output unit
        ((8, 12), ("columns", 4), (3,)),  # e.g. one block per head of a fused QKV Conv1D
        ((12, 8), ("rows", 4), (3,)),
        ((3, 5, 7), ((0, 1), 1), (3, 5)),  # experts (E, out, in): one per (expert, row)
        ((3, 7, 5), ((0, 2), 1), (3, 5)),  # transposed experts (E, in, out)
        ((3, 5, 7), "element", (3, 5, 7)),
        ((2, 3), "rows", (2,)),  # a spec applies below the small-tensor threshold too
        ((0, 4), "columns", (0, 4)),  # empty: per element
    ],
)
def test_spec_state_shapes(shape, spec, v_shape):
    layout = block_layout(shape, spec=spec)
    assert layout.state_shape(torch.Size(shape)) == torch.Size(v_shape)
    assert block_layout(shape, mini=False, spec=spec).per_element  # mini=False wins


@pytest.mark.parametrize(
    "spec, match",
    [
        ("diagonal", "unknown axes"), (("rows", 0), "positive int"), (("rows", True), "positive int"),
        (((1, 0), 1), "increasing"), (((), 1), "increasing"), ((0, 1), "increasing"), (3, "must be 'element'"),
        (("columns", 1, 2), "must be 'element'"),
    ],
)
def test_malformed_specs_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_spec(spec, "parameter 'w'")


@pytest.mark.parametrize("spec, match", [(((0, 3), 1), "do not exist"), (("columns", 5), "does not divide dim 1")])
def test_specs_that_do_not_fit_name_the_parameter(spec, match):
    w = torch.nn.Parameter(torch.zeros(4, 6, 8))
    with pytest.raises(ValueError, match=match) as error:
        AdamWMiniSF([{"params": [("blocks.0.w", w)], "block_layouts": [spec]}])
    assert "'blocks.0.w'" in str(error.value)
    with pytest.raises(ValueError, match="one layout spec"):
        AdamWMiniSF([{"params": [w], "block_layouts": [None, None]}])


def test_mean_square_is_the_mean_over_each_block():
    g = torch.randn(3, 6, 4, dtype=torch.float64)
    for spec, want in [
        ("columns", (g**2).mean(dim=(0, 2))),
        (("columns", 3), (g**2).unflatten(1, (2, 3)).mean(dim=(0, 2, 3))),
        (((0, 1), 1), (g**2).mean(dim=2)),
        (((0, 2), 2), (g**2).unflatten(2, (2, 2)).mean(dim=(1, 3))),
    ]:
        layout = block_layout(g.shape, spec=spec)
        torch.testing.assert_close(layout.mean_square(layout.blocked(g)), want)
        grid = layout.grid(g)  # the fused path's views broadcast to the same per-block values
        torch.testing.assert_close((grid * 0 + layout.grid_v(want, g.shape)).reshape(g.shape),
                                   (layout.blocked(g) * 0 + layout.broadcastable(want, g.dim())).reshape(g.shape))


@st.composite
def _shape_and_spec(draw):
    shape = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 4, 6]), min_size=1, max_size=4)))
    kind = draw(st.sampled_from(["none", "element", "named", "axes"]))
    if kind in ("none", "element"):
        return shape, None if kind == "none" else "element"
    if kind == "named":
        name = draw(st.sampled_from(["rows", "columns"] if len(shape) > 1 else ["rows"]))
        axes = (0,) if name == "rows" else (1,)
    else:
        axes = tuple(sorted(draw(st.sets(st.integers(0, len(shape) - 1), min_size=1))))
        name = axes
    size = draw(st.sampled_from([k for k in (1, 2, 3) if shape[axes[-1]] % k == 0]))
    return shape, draw(st.sampled_from([name, (name, size)] if size == 1 and kind == "named" else [(name, size)]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensors=st.lists(_shape_and_spec(), min_size=1, max_size=4), path=st.sampled_from(sorted(PATHS)),
       schedule_free=st.booleans(), weight_decay=st.sampled_from([0.0, 0.1]), seed=st.integers(0, 2**16))
def test_layouts_match_the_float64_reference_on_every_path(tensors, path, schedule_free, weight_decay, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [shape for shape, _ in tensors]
    specs = [spec for _, spec in tensors]
    values = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    hp = SpecHyper(lr=1e-2, beta2=0.9, warmup_steps=0, auto_lr=False, weight_decay=weight_decay,
                   schedule_free=schedule_free)
    params = [torch.nn.Parameter(v.float()) for v in values]
    opt = AdamWMiniSF([{"params": params, "block_layouts": specs}], lr=hp.lr, betas=(hp.beta1, hp.beta2),
                      warmup_steps=0, weight_decay=weight_decay, schedule_free=schedule_free, state_dtype="fp32",
                      **PATHS[path])
    spec = [SpecParam(y=v.clone(), layout=s) for v, s in zip(values, specs)]
    for _ in range(STEPS):
        # rows and columns of different scales, so that a block on the wrong axis changes the update
        grads = [torch.randn(s, generator=gen, dtype=torch.float64)
                 * torch.logspace(-2, 2, s[-1], dtype=torch.float64)
                 * torch.logspace(2, -2, s[0], dtype=torch.float64).view(-1, *[1] * (len(s) - 1))
                 for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.float()
        opt.step()
        spec_step(spec, grads, hp)
    for p, v, sp in zip(params, values, spec):
        moved = sp.y - v  # displacements: a tolerance on y itself would pass an optimizer that never moved
        torch.testing.assert_close(p.detach().double() - v, moved, rtol=1e-4,
                                   atol=1e-4 * float(moved.abs().max()) + 1e-7)


def test_block_layouts_survive_state_dict_and_resume_bit_exactly():
    def build():
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(8, 12))
        e = torch.nn.Parameter(torch.randn(3, 5, 7))
        opt = AdamWMiniSF([{"params": [w, e], "block_layouts": [("columns", 4), ((0, 1), 1)]}], lr=1e-2)
        return [w, e], opt

    def train(params, opt, steps, start):
        for i in range(start, start + steps):
            for j, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * i + j))
            opt.step()

    params, opt = build()
    train(params, opt, 3, 0)
    saved, weights = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    assert saved["param_groups"][0]["block_layouts"] == [("columns", 4), ((0, 1), 1)]
    train(params, opt, 2, 3)
    params2, opt2 = build()
    opt2.param_groups[0].pop("block_layouts")  # the loaded group brings its layouts
    with torch.no_grad():
        for p2, w in zip(params2, weights):
            p2.copy_(w)
    opt2.load_state_dict(saved)
    train(params2, opt2, 2, 3)
    for a, b in zip(params2, params):
        assert torch.equal(a, b)
    assert opt2.state[params2[0]]["exp_avg_sq"].shape == (3,)
    bad = dict(saved, param_groups=[dict(saved["param_groups"][0], block_layouts=[("rows", 5), None])])
    with pytest.raises(ValueError, match="does not divide"):
        opt2.load_state_dict(bad)


# ------------------------------------------------------------------- real models


def _first_step_v(model, groups, batch):
    opt = AdamWMiniSF(groups, lr=1e-3, betas=(0.9, 0.5), state_dtype="fp32", warmup_steps=0)
    model(batch, labels=batch).loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    opt.step()
    opt.zero_grad()
    return opt, grads


def _train(model, opt, batch, steps):
    losses = []
    for _ in range(steps):
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses


def test_gpt2_conv1d_weights_get_one_block_per_output_unit():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=96, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    batch = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    opt, grads = _first_step_v(model, refadamw.param_groups(model, weight_decay=0.1), batch)
    named = dict(model.named_parameters())
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight",
                 "transformer.h.1.mlp.c_proj.weight"):
        g = grads[name]  # Conv1D: (in, out); v_j = (1 − β2)·mean_i g_ij² on the first step
        torch.testing.assert_close(opt.state[named[name]]["exp_avg_sq"], 0.5 * (g**2).mean(dim=0))
    assert opt.state[named["transformer.wte.weight"]]["exp_avg_sq"].shape == (96,)  # an Embedding: rows
    losses = _train(model, opt, batch, 10)
    assert losses[-1] < losses[0]


def test_per_head_blocks_for_q_and_k_in_one_param_group():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=96)
    model = transformers.LlamaForCausalLM(config)
    head_dim = 32
    heads = {n: ("rows", head_dim) for n, _ in model.named_parameters()
             if n.endswith(("q_proj.weight", "k_proj.weight"))}
    groups = refadamw.param_groups(model, weight_decay=0.1, block_layouts=heads)
    assert len(groups) == 2
    batch = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    opt, grads = _first_step_v(model, groups, batch)
    named = dict(model.named_parameters())
    q = "model.layers.0.self_attn.q_proj.weight"
    want = 0.5 * (grads[q] ** 2).view(4, head_dim, 128).mean(dim=(1, 2))
    torch.testing.assert_close(opt.state[named[q]]["exp_avg_sq"], want)
    assert opt.state[named["model.layers.0.self_attn.k_proj.weight"]]["exp_avg_sq"].shape == (2,)
    assert opt.state[named["model.layers.0.self_attn.v_proj.weight"]]["exp_avg_sq"].shape == (64,)
    with pytest.raises(ValueError, match="does not have"):
        refadamw.param_groups(model, weight_decay=0.1, block_layouts={"no.such.weight": "rows"})
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.q_proj.weight'"):
        AdamWMiniSF(refadamw.param_groups(model, weight_decay=0.1, block_layouts={q: ("rows", 5)}))


@pytest.mark.parametrize("family", ["Mixtral", "Olmoe"])
def test_moe_experts_get_one_block_per_expert_and_output_row(family):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(
        hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=96, **({"num_local_experts": 4} if family == "Mixtral" else {"num_experts": 4}),
        num_experts_per_tok=2)
    model = getattr(transformers, f"{family}ForCausalLM")(config)
    batch = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    opt, grads = _first_step_v(model, refadamw.param_groups(model, weight_decay=0.1), batch)
    named = dict(model.named_parameters())
    experts = [n for n in named if ".experts." in n]
    assert experts
    for name in experts:  # (experts, out, in): v_er = (1 − β2)·mean_i g_eri²
        assert named[name].dim() == 3
        torch.testing.assert_close(opt.state[named[name]]["exp_avg_sq"], 0.5 * (grads[name] ** 2).mean(dim=2))
    losses = _train(model, opt, batch, 10)
    assert losses[-1] < losses[0]


def test_transposed_experts_block_by_their_output_axis():
    # GPT-OSS / Llama-4 style experts store (experts, in, out); transformers marks them is_transposed.
    class Experts(torch.nn.Module):
        num_experts = 4
        is_transposed = True

        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.randn(4, 32, 64))

    model = torch.nn.Sequential(Experts())
    (group,) = refadamw.param_groups(model, weight_decay=0.0)
    assert group["block_layouts"] == [((0, 2), 1)]
    layout = block_layout((4, 32, 64), spec=group["block_layouts"][0])
    assert layout == BlockLayout(n_blocks=256, block_rows=1, axes=(0, 2))
