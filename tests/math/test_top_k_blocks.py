"""`top_k_positions`' block pre-filter on long rows (n a multiple of 64, over 4 (k+1) blocks) gives exactly the
whole-row answer (the k largest, ties to the lower position), on rows with ties inside a block, equal block maxima
across the boundary, -inf entries, a constant row and integer-valued rows, and on a strided view."""

import pytest
import torch

from opd_megatron.math.supports import _whole_row_top_k, top_k_positions


@pytest.mark.parametrize("k", [1, 5, 20])
def test_block_prefilter_equals_whole_rows(k):
    gen = torch.Generator().manual_seed(k)
    n = 64 * 100
    storage = torch.randn(12, n + 64, generator=gen) * 3
    values = storage[:, :n]                                   # rows of stride n + 64, as a vocabulary slice
    values[1, 100:140] = 40.0                                 # ties inside and across blocks, at the top
    values[2, ::64] = 30.0                                    # 100 equal block maxima: the k-th ties the (k+1)-th
    values[3, :] = float("-inf")
    values[3, 5:8] = 1.0
    values[4, :] = 2.5                                        # a constant row
    values[5] = torch.randint(0, 4, (n,), generator=gen).float()
    values[6, 300] = values[6].max() + 1                      # an ordinary row with one clear maximum
    got = top_k_positions(values, k)
    assert torch.equal(got, _whole_row_top_k(values, k))
    assert got[4].tolist() == list(range(k)) and got[1].tolist() == list(range(100, 100 + k))
    assert torch.equal(top_k_positions(values.contiguous(), k), got)
