import pytest
import torch

from refadamw.partition import SMALL_NUMEL, BlockLayout, block_layout


@pytest.mark.parametrize(
    "shape, mini, block_rows, v_shape",
    [
        ((64, 64), True, 1, (64,)),  # one block per output row
        ((128, 32, 3, 3), True, 1, (128,)),  # one block per output channel
        ((32, 8, 4, 4), True, 4, (8,)),  # rows grouped, e.g. per attention head
        ((64,), True, 1, (64,)),  # 1-D: per element
        ((), True, 1, ()),  # 0-D: per element
        ((3, 5), True, 1, (3,)),  # small 2-D (a LoRA factor): still one block per row
        ((8, 320), True, 4, (8,)),  # block_rows applies to large tensors only
        ((2, 3, 5), True, 1, (2, 3, 5)),  # small 3-D: per element
        ((64, 64), False, 1, (64, 64)),  # mini off: per element
        ((0, 4096), True, 1, (0, 4096)),  # empty: per element
    ],
)
def test_block_shapes(shape, mini, block_rows, v_shape):
    assert block_layout(shape, mini, block_rows).state_shape(torch.Size(shape)) == torch.Size(v_shape)


def test_small_threshold_is_exact():
    assert block_layout((1, 1, SMALL_NUMEL - 1)).per_element
    assert not block_layout((1, 1, SMALL_NUMEL)).per_element
    assert block_layout((2, SMALL_NUMEL // 2 - 1), True, 2).n_blocks == 2  # under it, block_rows is not applied
    assert block_layout((2, SMALL_NUMEL // 2), True, 2).n_blocks == 1


@pytest.mark.parametrize("rows", [0, -1, 1.5, True])
def test_bad_block_rows(rows):
    with pytest.raises(ValueError, match="block_rows"):
        block_layout((64, 64), True, rows)


def test_block_rows_must_divide_dim0():
    with pytest.raises(ValueError, match="does not divide"):
        block_layout((66, 64), True, 4)


def test_mean_square_is_block_mean_of_squares():
    g = torch.randn(32, 8, 4, 4, dtype=torch.float64)
    layout = block_layout(g.shape, True, 4)
    got = layout.mean_square(layout.blocked(g))
    want = torch.stack([(g[b * 4:(b + 1) * 4] ** 2).mean() for b in range(8)])
    torch.testing.assert_close(got, want)
    assert BlockLayout().mean_square(g).shape == g.shape


def test_blocked_views_share_storage_for_any_layout():
    p = torch.randn(64, 16, 3, 3).to(memory_format=torch.channels_last)
    layout = block_layout(p.shape)
    view = layout.blocked(p)
    view.mul_(0)
    assert p.abs().sum() == 0  # an in-place update through the view reached p
    v = torch.rand(layout.state_shape(p.shape))
    assert (view / layout.broadcastable(v, p.dim())).shape == view.shape
