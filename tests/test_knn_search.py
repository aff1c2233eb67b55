"""`tasks.knn.knn_search` (float32 and float16 banks, blocked with a running top-k) against brute force."""
import pytest
import torch
import torch.nn.functional as F

from core.cli import UserError
from tasks.knn import knn_search, merge_topk

# |q . b - q . fl16(b)| <= |q| |b - fl16(b)| <= 2^-11 for unit vectors; a search of the float16 bank may swap
# neighbours whose exact similarities are within two such roundings (plus float32 sums)
FLOAT16_TIE = 2 * 2.0 ** -11 + 1e-5


def unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def brute_force(bank, queries, k):
    """Exact (float64) similarities of every pair, and the k best per query by a full sort."""
    sims = queries.double() @ bank.double().T
    order = sims.argsort(dim=1, descending=True)[:, :k]
    return sims, sims.gather(1, order), order


@pytest.mark.parametrize("block, chunk", [(8192, 4096), (333, 17), (50, 1)])
def test_float32_bank_is_an_exact_search(block, chunk):
    bank, queries = unit(2000, 24, 0), unit(60, 24, 1)
    sims, idx = knn_search(bank, queries, 25, chunk, "cpu", "float32", block=block)
    _, exact_sims, exact_idx = brute_force(bank, queries, 25)
    assert sims.dtype == torch.float32 and idx.dtype == torch.long and sims.shape == idx.shape == (60, 25)
    assert torch.equal(idx, exact_idx)  # continuous random data: no ties
    assert (sims.double() - exact_sims).abs().max() < 1e-6


@pytest.mark.parametrize("block, chunk", [(8192, 4096), (333, 17)])
def test_float16_bank_finds_the_exact_neighbours_up_to_float16_ties(block, chunk):
    bank, queries = unit(3000, 32, 2), unit(80, 32, 3)
    sims, idx = knn_search(bank, queries, 40, chunk, "cpu", "float16", block=block)
    all_exact, exact_sims, exact_idx = brute_force(bank, queries, 40)
    ours_exact = all_exact.gather(1, idx)  # exact similarity of each neighbour we returned
    # at every rank, our neighbour is as similar as the exact one up to float16 rounding
    assert (ours_exact - exact_sims).abs().max() <= FLOAT16_TIE
    # the similarities returned are those of the stored (rounded) bank: within one rounding of the exact ones
    assert (sims.double() - ours_exact).abs().max() <= FLOAT16_TIE / 2
    # and a neighbour differs from the exact search only where the two are that close
    for q in range(len(queries)):
        for j in set(idx[q].tolist()) ^ set(exact_idx[q].tolist()):
            assert abs(all_exact[q, j] - exact_sims[q, -1]) <= FLOAT16_TIE
    assert (idx == exact_idx).float().mean() > 0.95
    # a bank already stored in float16 gives the same answer
    sims16, idx16 = knn_search(bank.half(), queries, 40, chunk, "cpu", "float16", block=block)
    assert torch.equal(idx16, idx) and torch.equal(sims16, sims)


def test_merge_topk_is_the_topk_of_the_union():
    g = torch.Generator().manual_seed(4)
    a, b = torch.rand(5, 7, generator=g), torch.rand(5, 9, generator=g)
    ia, ib = torch.arange(7).expand(5, 7), 100 + torch.arange(9).expand(5, 9)
    sims, idx = merge_topk(a, ia, b, ib, 6)
    ref = torch.cat([a, b], 1).topk(6, dim=1)
    assert torch.equal(sims, ref.values)
    assert torch.equal(idx, torch.cat([ia, ib], 1).gather(1, ref.indices))


def test_bad_requests():
    bank, queries = unit(10, 4, 5), unit(2, 4, 6)
    with pytest.raises(UserError, match="bank_dtype"):
        knn_search(bank, queries, 3, 4, "cpu", "int8")
    with pytest.raises(ValueError, match="k = 11"):
        knn_search(bank, queries, 11, 4, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_half_precision_search_matches_the_cpu():
    bank, queries = unit(5000, 64, 7), unit(100, 64, 8)
    all_exact, exact_sims, _ = brute_force(bank, queries, 30)
    for dtype in ("float32", "float16"):
        sims, idx = knn_search(bank, queries, 30, 64, "cuda", dtype, block=1000)
        assert sims.device.type == "cpu"
        # the queries are rounded to float16 as well on the GPU: up to two roundings per side
        assert (all_exact.gather(1, idx) - exact_sims).abs().max() <= 2 * FLOAT16_TIE
