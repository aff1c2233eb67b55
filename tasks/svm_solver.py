"""Many L2-regularised squared-hinge linear SVMs trained together on one feature matrix.

Each problem p solves the primal that scikit-learn's LinearSVC (liblinear) solves:

    f_p(w) = 1/2 |w|^2 + sum_i C_pi max(0, 1 - y_pi w . [x_i, 1])^2,   C_pi = C_p * (positive_weight if y_pi > 0 else 1)

(the bias is the last weight and is regularised, LinearSVC's `intercept_scaling=1`). The squared hinge
makes f_p once differentiable with a generalised Hessian, so Newton's method applies (Keerthi & DeCoste
2005; Chapelle 2007; liblinear's TRON): the Newton direction comes from conjugate gradients on
H_p = I + 2 X^T diag(C_pi [i active]) X, and the step length from an exact search on the piecewise
quadratic along it. All problems advance together: every product with X is one matrix product over
all problems (on the accelerator when present), which is where the speed comes from. Started from the
solution of a smaller cost (`init`), as liblinear's cost search does, a problem needs fewer Newton steps.
"""
import numpy as np
import torch


def _objective_terms(y, cost, outputs):
    """Per sample: the active-set weight C_pi [y_pi o_pi < 1]."""
    return (y * outputs < 1).to(outputs.dtype) * cost


def _line_search(w, s, outputs, z, y, cost, iterations=20):
    """argmin_t f(w + t s) for each problem by Newton steps on the 1-D piecewise quadratic (z = X s)."""
    ws, ss = (w * s).sum(1), (s * s).sum(1)
    t = torch.ones(len(w), dtype=w.dtype, device=w.device)
    for _ in range(iterations):
        o = outputs + t[:, None] * z
        act = _objective_terms(y, cost, o)
        slope = ws + t * ss + 2 * (act * (o - y) * z).sum(1)
        curvature = ss + 2 * (act * z * z).sum(1)
        t = t - slope / curvature
    return t


def fit_linear_svms(x, y, costs, train_mask=None, positive_weight=1.0, tol=1e-4, max_newton=100, max_cg=500,
                    cg_tol=0.1, init=None, device="cpu"):
    """x: (n, d) features; y: (P, n) labels in {-1, +1}; costs: (P,); train_mask: (P, n) bool, the samples
    each problem trains on (default all); init: (P, d + 1) starting weights with the bias last (default 0).
    A problem stops when |grad f_p| <= tol |grad f_p(0)|, whatever the start; each Newton direction is
    solved to a relative residual of cg_tol (TRON's). Returns NumPy arrays (weights (P, d), bias (P,),
    Newton iterations (P,))."""
    dtype = torch.float32
    xb = torch.as_tensor(np.asarray(x), dtype=dtype, device=device)
    xb = torch.cat([xb, torch.ones(len(xb), 1, dtype=dtype, device=device)], 1)  # the bias feature
    y = torch.as_tensor(np.asarray(y), dtype=dtype, device=device)
    P, n = y.shape
    mask = torch.ones(P, n, dtype=torch.bool, device=device) if train_mask is None else \
        torch.as_tensor(np.asarray(train_mask), device=device)
    cost = torch.as_tensor(np.asarray(costs, float), dtype=dtype, device=device)[:, None]
    cost = cost * torch.where(y > 0, positive_weight, 1.0) * mask  # samples outside the mask weigh nothing

    w = torch.zeros(P, xb.shape[1], dtype=dtype, device=device) if init is None else \
        torch.as_tensor(np.asarray(init), dtype=dtype, device=device).clone()
    outputs = w @ xb.T  # X w, kept with w
    iterations = np.zeros(P, int)
    first_norm = (2 * (cost * y) @ xb).norm(dim=1)  # |grad f_p(0)|: every sample is active at w = 0
    for it in range(1, max_newton + 1):
        act = _objective_terms(y, cost, outputs)
        grad = w + 2 * (act * (outputs - y)) @ xb
        norm = grad.norm(dim=1)
        todo = torch.nonzero(norm > tol * first_norm).flatten()
        if len(todo) == 0:
            break
        iterations[todo.cpu().numpy()] = it
        wt, gt, at, yt, ct, ot = w[todo], grad[todo], act[todo], y[todo], cost[todo], outputs[todo]
        # conjugate gradients on H s = -g; a problem leaves the batch when its residual is small enough
        s, r = torch.zeros_like(gt), -gt
        p, rr = r.clone(), (r * r).sum(1)
        target = (cg_tol * norm[todo]) ** 2
        live = torch.arange(len(todo), device=device)
        for _ in range(max_cg):
            live = live[rr[live] > target[live]]
            if len(live) == 0:
                break
            pl, rl = p[live], rr[live]
            hp = pl + 2 * (at[live] * (pl @ xb.T)) @ xb
            step = rl / (pl * hp).sum(1)
            s[live] += step[:, None] * pl
            r[live] -= step[:, None] * hp
            rr[live] = (r[live] * r[live]).sum(1)
            p[live] = r[live] + (rr[live] / rl)[:, None] * pl
        z = s @ xb.T
        t = _line_search(wt, s, ot, z, yt, ct)
        w[todo] = wt + t[:, None] * s
        outputs[todo] = ot + t[:, None] * z
    w = w.cpu().double().numpy()
    return w[:, :-1], w[:, -1], iterations
