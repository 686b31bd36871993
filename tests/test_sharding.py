"""Sharded tensors draw the rounding noise of their global element index.

FSDP2 hands the kernels a rank's dim-0 shard (rows ``[r0, r1)`` as ``torch.chunk``
cuts them) and ``index_offsets`` says where it starts in the whole flattened
tensor. Here the shards are simulated in one process, with plain tensors: the
whole tensor's state is cut into the shards' views, each shard is updated
alone, and the pieces must put back the whole-tensor run bit for bit, at every
world size. The real FSDP2 run is in tests/test_distributed.py.
"""

from __future__ import annotations

import pytest
import torch

from refadamw import AdamWMiniSF, kernels, param_state
from refadamw.partition import block_layout
from refadamw.precision import Salt, random_bits, rounding_keys, shift_key, stochastic_round, tensor_key

ROWS, COLS, STEPS = 11, 400, 4  # 4400 elements: mini row blocks; 11 rows shard unevenly at every world size > 1


def test_a_shifted_key_draws_the_words_of_the_global_index():
    key = rounding_keys(torch.tensor(tensor_key(0, 3), dtype=torch.int32), torch.tensor(5.0), Salt.Z_MINUS_Y)
    whole = random_bits(1000, key)
    for offset in (1, 337, 999):
        assert torch.equal(random_bits(1000 - offset, shift_key(key, offset)), whole[offset:])
    assert torch.equal(shift_key(key, 0), key)
    far = (1 << 31) + 5  # beyond int32: the shift wraps modulo 2³², as the index arithmetic does
    assert torch.equal(random_bits(10, shift_key(shift_key(key, far), -far)), whole[:10])
    x = torch.rand(1000) + 1
    assert torch.equal(stochastic_round(x[337:], torch.bfloat16, shift_key(key, 337)),
                       stochastic_round(x, torch.bfloat16, key)[337:])


def _whole_run(options, param_dtype, grads, foreach):
    param = torch.nn.Parameter(torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(0)).to(param_dtype))
    opt = AdamWMiniSF([param], lr=1e-2, foreach=foreach, fused=False, **options)
    for g in grads:
        param.grad = g.to(param_dtype)
        opt.step()
    return param.detach().clone(), {k: v.clone() for k, v in opt.state[param].items()}


def _sharded_run(options, param_dtype, grads, foreach, world, offsets_on=True):
    """Each rank's shard updated alone; the shards' param and state put back together."""
    param = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(0)).to(param_dtype)
    opt = AdamWMiniSF([torch.nn.Parameter(param)], lr=1e-2, **options)  # for its state layout and hyperparameters
    group = opt.param_groups[0]
    whole_state = param_state.init_state(group, param, opt.seed, 0)
    layout = block_layout(param.shape, group["mini"], group["block_rows"])
    shards = []
    for rows in torch.arange(ROWS).chunk(world):
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        # buffers: views of their rows (mini v: one block per row); per-tensor scalars: a copy per shard
        state = {k: v[r0:r1] if v.dim() else v.clone() for k, v in whole_state.items()}
        local_layout = layout if layout.per_element else type(layout)(n_blocks=r1 - r0, block_rows=1)
        shards.append((slice(r0, r1), state, local_layout, r0 * COLS if offsets_on else 0))
    for step, g in enumerate(grads):
        for rows, state, local_layout, offset in shards:
            kernels.update([param[rows]], [g.to(param_dtype)[rows]], [state], [local_layout], param_state.hyper(group),
                           fresh=[step == 0], foreach=foreach, index_offsets=[offset])
    return param, whole_state


CASES = [
    pytest.param({}, torch.float32, id="default-bf16-state"),
    pytest.param({}, torch.bfloat16, id="bf16-params"),
    pytest.param({"mini": False}, torch.bfloat16, id="per-element-v"),
    pytest.param({"state_dtype": "fp16"}, torch.float16, id="fp16"),
    pytest.param({"schedule_free": False}, torch.bfloat16, id="adamw-mini"),
]


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "reference"])
@pytest.mark.parametrize("options, param_dtype", CASES)
def test_shards_put_back_the_whole_tensor_run_bit_for_bit(options, param_dtype, foreach):
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(ROWS, COLS, generator=gen) for _ in range(STEPS)]
    expected_param, expected_state = _whole_run(options, param_dtype, grads, foreach)
    for world in (1, 2, 3, 4):
        param, state = _sharded_run(options, param_dtype, grads, foreach, world)
        assert torch.equal(param, expected_param), world
        for key in ("z_minus_y", "exp_avg", "exp_avg_sq"):
            if key in expected_state:
                assert torch.equal(state[key], expected_state[key]), (world, key)


def test_without_the_offset_every_shard_draws_the_first_shards_noise():
    # What the kernels did before the global index: the shards of a 2-rank run differ from the whole run.
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(ROWS, COLS, generator=gen) for _ in range(STEPS)]
    expected_param, expected_state = _whole_run({}, torch.bfloat16, grads, True)
    param, state = _sharded_run({}, torch.bfloat16, grads, True, 2, offsets_on=False)
    assert torch.equal(param[:6], expected_param[:6])  # rank 0 starts at 0 either way
    assert not torch.equal(param[6:], expected_param[6:])
    assert not torch.equal(state["z_minus_y"][6:], expected_state["z_minus_y"][6:])
