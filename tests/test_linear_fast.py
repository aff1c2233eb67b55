"""The fast linear probe's feature bank: moved to the device once, or streamed in blocks when it does not fit; the
streamed solution is the resident one."""
import torch

from tasks.linear import FeatureBank, fit_logistic_regression, train_linear_fast


def problem(n=300, d=12, classes=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return 3 + 2 * centres[y] + torch.randn(n, d, generator=g, dtype=dtype), y


def test_streamed_blocks_give_the_resident_solution():
    """Blocks of 7 rows (the remainder block of 6 included) against the whole bank at once, on a subset of rows:
    the objective is the same sum, so L-BFGS reaches the same optimum (float64; within 1e-8 after convergence)."""
    x, y = problem()
    rows = torch.arange(len(x)) % 5 != 0
    w, b = fit_logistic_regression(x, y, 4, 1e-2, max_iter=300, rows=rows)
    bank = FeatureBank(x, "cpu", block_rows=7)
    assert bank.block_rows == 7 and [len(xb) for _, xb in bank.blocks()][-1] == 300 % 7
    ws, bs = fit_logistic_regression(bank, y, 4, 1e-2, max_iter=300, rows=rows)
    torch.testing.assert_close(ws, w, rtol=0, atol=1e-8)
    torch.testing.assert_close(bs, b, rtol=0, atol=1e-8)
    # and the subset objective is not the full one
    wf, _ = fit_logistic_regression(x, y, 4, 1e-2, max_iter=300)
    assert (wf - w).abs().max() > 1e-3


def test_fast_probe_streamed_equals_resident():
    """The whole probe (held-out choice of L2, refit, prediction) with blocks of 64 rows: float64 features, so that
    both runs converge to the same optimum and the sums in another order differ by rounding only."""
    x, y = problem(n=400, seed=1)
    xte, _ = problem(n=100, seed=2)
    resident = train_linear_fast(x, y, 4, (1e-3, 1e-2, 1e-1), 0.2, 300, seed=0)
    streamed = train_linear_fast(x, y, 4, (1e-3, 1e-2, 1e-1), 0.2, 300, seed=0, block_rows=64)
    assert streamed[1] == resident[1] and streamed[2] == resident[2]  # the same choice from the same held-out scores
    torch.testing.assert_close(streamed[0](xte), resident[0](xte), rtol=0, atol=1e-6)


def test_standardised_bank_uses_the_given_statistics():
    x, _ = problem(n=50, dtype=torch.float32)
    mean, std = x.mean(0), x.std(0)
    for block_rows in (None, 8):
        bank = FeatureBank(x, "cpu", mean, std, block_rows)
        got = torch.cat([xb for _, xb in bank.blocks()])
        torch.testing.assert_close(got, (x - mean) / std)
