"""Many L2-regularised squared-hinge linear SVMs trained together on one feature matrix.

Each problem p solves the primal that scikit-learn's LinearSVC (liblinear) solves:

    f_p(w) = 1/2 |w|^2 + sum_i C_pi max(0, 1 - y_pi w . [x_i, 1])^2,   C_pi = C_p * (positive_weight if y_pi > 0 else 1)

(the bias is the last weight and is regularised, LinearSVC's `intercept_scaling=1`). The squared hinge
makes f_p once differentiable with a generalised Hessian H_p = I + 2 X^T diag(C_pi [i active]) X, so
Newton's method applies (Keerthi & DeCoste 2005; Chapelle 2007; liblinear's TRON), with the step length
from an exact search on the piecewise quadratic along the Newton direction. All problems advance
together: every product with X is one matrix product over all problems (on the accelerator when
present). Started from the solution of a smaller cost (`init`), as liblinear's cost search does, a
problem needs fewer Newton steps.

The Newton direction s = -H_p^-1 g comes one of two ways, whichever costs less for the problem:
- few active samples S (large costs): exactly, by Woodbury's identity
  H_p^-1 = I - X_S^T (diag(1 / 2 C_pS) + X_S X_S^T)^-1 X_S, a Cholesky factorisation of |S| x |S| with
  X_S X_S^T read from X X^T, computed once; at large costs H_p spans many orders of magnitude (2 C_p
  times the eigenvalues of X_S^T X_S) and conjugate gradients would need hundreds of products with X;
- many active samples: conjugate gradients to TRON's relative residual, preconditioned by the diagonal
  of H_p in the top principal directions of X (pooled features share a large common direction and a
  few strong ones) and by the mean of its diagonal elsewhere, both from the active samples.
How the direction is found changes how fast the solver gets there, not where: it stops on |grad f_p|.
"""
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def _threads(n):
    """torch's CPU thread count set to n inside the block. The solver's own work is elementwise on
    (problems x samples) arrays, too small to gain from threads: run threaded, each such operation waits
    for every thread, and on a loaded machine for a descheduled one (measured on a busy 2-core machine:
    elementwise work 12x, a 1000 x 1000 Cholesky factorisation 4x slower with 2 threads than with 1).
    Only the products with X use all the threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class SharedFeatures:
    """The feature matrix of every problem, prepared once and shared by all classes, folds and costs:
    X with its bias column in float32 on the device, and its `directions` top principal directions V
    (randomized subspace iteration, Halko et al. 2011) with the squared projections (X V)^2 that the
    preconditioner weighs by each problem's active samples; X X^T for the exact Newton steps."""

    def __init__(self, x, device="cpu", directions=256, exact_below=None, power_iterations=3, seed=0):
        self.threads = torch.get_num_threads()
        xb = torch.as_tensor(np.asarray(x), dtype=torch.float32, device=device)
        self.xb = torch.cat([xb, torch.ones(len(xb), 1, dtype=torch.float32, device=device)], 1)
        n, dim = self.xb.shape
        k = min(directions, n, dim)
        g = torch.Generator(device=device).manual_seed(seed)
        basis = torch.randn(dim, min(k + 16, n, dim), generator=g, device=device)
        for _ in range(power_iterations):  # basis <- orth(X^T X basis)
            product = self.xtv(self.xw(basis.T)).T
            with _threads(1):
                basis = torch.linalg.qr(product).Q
        projected = self.xw(basis.T).T
        with _threads(1):  # Rayleigh-Ritz: the principal axes within the basis
            _, rotation = torch.linalg.eigh(projected.T @ projected)
        self.directions = basis @ rotation.flip(1)[:, :k]  # (d + 1, k), largest first
        self.projections_sq = self.xw(self.directions.T).T ** 2  # (n, k)
        # squared norm of each sample outside the directions, and the dimension it is spread over
        self.outside = ((self.xb * self.xb).sum(1) - self.projections_sq.sum(1)).clamp(min=0)
        self.outside_dim = max(min(n, dim) - k, 1)
        # an exact Newton step costs |S|^3 / 3 (Cholesky on the active set S): by default, take it while
        # that is below about 20 conjugate-gradient iterations (4 n (d + 1) each)
        self.exact_below = int((3 * 20 * 4 * n * dim) ** (1 / 3)) if exact_below is None else exact_below
        self._kernel = None

    def xw(self, w):
        """X w for each row of w (P, d + 1): (P, n)."""
        with _threads(self._threads_for(w)):
            return w @ self.xb.T

    def xtv(self, v):
        """X^T v for each row of v (P, n): (P, d + 1)."""
        with _threads(self._threads_for(v)):
            return v @ self.xb

    def _threads_for(self, rows):
        multiply_adds = rows.numel() * self.xb.numel() // rows.shape[1]
        return self.threads if multiply_adds >= 2 ** 22 else 1

    def kernel(self):
        """X X^T (n, n), computed once on first use (the exact Newton steps read it)."""
        if self._kernel is None:
            with _threads(self.threads):
                self._kernel = self.xb @ self.xb.T
        return self._kernel

    def preconditioner(self, active):
        """M_p^-1 for the Newton systems of problems with active weights `active` (P, n): a function of
        (residuals (L, d + 1), which problems (L,))."""
        inside = 1 + 2 * active @ self.projections_sq  # (P, k): diag of V^T H_p V
        outside = 1 + 2 * (active @ self.outside) / self.outside_dim  # (P,): mean diag of H_p outside V
        v = self.directions

        def apply(r, which):
            c = r @ v
            return (r - c @ v.T) / outside[which, None] + (c / inside[which]) @ v.T

        return apply


def _objective_terms(y, cost, outputs):
    """Per sample: the active-set weight C_pi [y_pi o_pi < 1]."""
    return (y * outputs < 1).to(outputs.dtype) * cost


def _line_search(w, s, outputs, z, y, cost, iterations=20):
    """argmin_t f(w + t s) for each problem by Newton steps on the 1-D piecewise quadratic (z = X s); the
    steps end once no problem's step moves t by more than 1e-6 (exact when the active set stops changing)."""
    ws, ss = (w * s).sum(1), (s * s).sum(1)
    t = torch.ones(len(w), dtype=w.dtype, device=w.device)
    for _ in range(iterations):
        o = outputs + t[:, None] * z
        act = _objective_terms(y, cost, o)
        slope = ws + t * ss + 2 * (act * (o - y) * z).sum(1)
        curvature = ss + 2 * (act * z * z).sum(1)
        step = slope / curvature
        t = t - step
        if step.abs().max() <= 1e-6 * t.abs().max():
            break
    return t


def _cg_direction(shared, g, act, norm, cg_tol, max_cg):
    """Newton directions s (and X s) by preconditioned conjugate gradients on H s = -g, one problem per row;
    a problem leaves the batch when its residual is below cg_tol |g| (TRON's rule)."""
    precondition = shared.preconditioner(act)
    s, xs, r = torch.zeros_like(g), torch.zeros(len(g), len(shared.xb), dtype=g.dtype, device=g.device), -g
    live = torch.arange(len(g), device=g.device)
    p = precondition(r, live)
    rz, rr = (r * p).sum(1), (r * r).sum(1)
    target = (cg_tol * norm) ** 2
    for _ in range(max_cg):
        live = live[rr[live] > target[live]]
        if len(live) == 0:
            break
        pl, rzl = p[live], rz[live]
        xp = shared.xw(pl)
        hp = pl + 2 * shared.xtv(act[live] * xp)
        step = rzl / (pl * hp).sum(1)
        s[live] += step[:, None] * pl
        xs[live] += step[:, None] * xp
        rl = r[live] - step[:, None] * hp
        r[live], rr[live] = rl, (rl * rl).sum(1)
        zl = precondition(rl, live)
        rz[live] = (rl * zl).sum(1)
        p[live] = zl + (rz[live] / rzl)[:, None] * pl
    return s, xs


def _exact_direction(shared, g, act):
    """Newton directions s = -H^-1 g (and X s) exactly, through the active samples S (Woodbury):
    H^-1 = I - X_S^T (diag(1 / 2 C_S) + X_S X_S^T)^-1 X_S, with X_S X_S^T read from the kernel matrix."""
    kernel, xg = shared.kernel(), shared.xw(g)
    u = torch.zeros_like(xg)
    for j in range(len(g)):
        active = torch.nonzero(act[j]).flatten()
        system = kernel[active[:, None], active[None, :]]
        system.diagonal().add_(0.5 / act[j, active])
        u[j, active] = _solve_spd(system, xg[j, active])
    s = shared.xtv(u) - g
    return s, shared.xw(s)


def _solve_spd(a, b):
    """a^-1 b for a symmetric positive definite float32 `a` (the exact Newton systems) by Cholesky: in
    float32 (relative error about 1e-3 at the largest costs, plenty for a Newton direction), in float64
    when float32 cannot factor `a`."""
    factor, info = torch.linalg.cholesky_ex(a)
    if info.item() == 0:
        return torch.cholesky_solve(b[:, None], factor)[:, 0]
    return torch.cholesky_solve(b.double()[:, None], torch.linalg.cholesky(a.double()))[:, 0].float()


def fit_linear_svms(x, y, costs, train_mask=None, positive_weight=1.0, tol=1e-4, max_newton=100, max_cg=500,
                    cg_tol=0.1, init=None, device="cpu"):
    """x: (n, d) features or their `SharedFeatures`; y: (P, n) labels in {-1, +1}; costs: (P,); train_mask:
    (P, n) bool, the samples each problem trains on (default all); init: (P, d + 1) starting weights with
    the bias last (default 0). A problem stops when |grad f_p| <= tol |grad f_p(0)|, whatever the start.
    Each Newton direction is exact when the problem has few active samples (`SharedFeatures.exact_below`),
    else solved by conjugate gradients to a relative residual of cg_tol (TRON's). Returns NumPy arrays
    (weights (P, d), bias (P,), Newton iterations (P,))."""
    shared = x if isinstance(x, SharedFeatures) else SharedFeatures(x, device)
    with _threads(1):
        return _fit(shared, y, costs, train_mask, positive_weight, tol, max_newton, max_cg, cg_tol, init)


def _fit(shared, y, costs, train_mask, positive_weight, tol, max_newton, max_cg, cg_tol, init):
    dtype, device = shared.xb.dtype, shared.xb.device
    y = torch.as_tensor(np.asarray(y), dtype=dtype, device=device)
    P, n = y.shape
    mask = torch.ones(P, n, dtype=torch.bool, device=device) if train_mask is None else \
        torch.as_tensor(np.asarray(train_mask), device=device)
    cost = torch.as_tensor(np.asarray(costs, float), dtype=dtype, device=device)[:, None]
    cost = cost * torch.where(y > 0, positive_weight, 1.0) * mask  # samples outside the mask weigh nothing

    w = torch.zeros(P, shared.xb.shape[1], dtype=dtype, device=device) if init is None else \
        torch.as_tensor(np.asarray(init), dtype=dtype, device=device).clone()
    outputs = shared.xw(w)  # X w, kept with w
    iterations = np.zeros(P, int)
    first_norm = (2 * shared.xtv(cost * y)).norm(dim=1)  # |grad f_p(0)|: every sample is active at w = 0
    for it in range(1, max_newton + 1):
        act = _objective_terms(y, cost, outputs)
        grad = w + 2 * shared.xtv(act * (outputs - y))
        norm = grad.norm(dim=1)
        todo = torch.nonzero(norm > tol * first_norm).flatten()
        if len(todo) == 0:
            break
        iterations[todo.cpu().numpy()] = it
        s, xs = torch.empty_like(w[todo]), torch.empty_like(outputs[todo])
        exact = (act[todo] > 0).sum(1) < shared.exact_below
        for group, direction in ((exact, _exact_direction), (~exact, _cg_direction)):
            if group.any():
                g = grad[todo[group]]
                args = (norm[todo[group]], cg_tol, max_cg) if direction is _cg_direction else ()
                s[group], xs[group] = direction(shared, g, act[todo[group]], *args)
        t = _line_search(w[todo], s, outputs[todo], xs, y[todo], cost[todo])
        w[todo] += t[:, None] * s
        outputs[todo] += t[:, None] * xs
    w = w.cpu().double().numpy()
    return w[:, :-1], w[:, -1], iterations
