"""Metrics, kNN and the linear probe against independent references (brute force, scikit-learn)."""
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from tasks.knn import knn_classify
from tasks.linear import fit_logistic_regression, stratified_holdout, train_linear_fast
from tasks.metrics import topk_accuracy, weighted_knn_scores


def test_topk_accuracy_hand_computed():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5], [0.3, 0.4, 0.3]])
    labels = torch.tensor([2, 0, 0, 0])
    acc = topk_accuracy(scores, labels, (1, 2, 5))
    assert acc[1] == 25.0  # only row 1
    assert acc[2] == 75.0  # rows 0, 1 and 3 (0.3 ties 0.3 at index 0 first)
    assert acc[5] == 100.0  # k capped at 3 classes


def test_knn_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(300, 16, generator=g), torch.randn(40, 16, generator=g)
    train_y = torch.randint(0, 7, (300,), generator=g)
    got = knn_classify(train_x, train_y, test_x, (1, 5, 20), 0.07, 7, chunk=13)
    a = train_x.numpy() / np.linalg.norm(train_x.numpy(), axis=1, keepdims=True)
    q = test_x.numpy() / np.linalg.norm(test_x.numpy(), axis=1, keepdims=True)
    for k, scores in got.items():
        for i in range(len(q)):
            sims = [float(q[i] @ a[j]) for j in range(len(a))]
            order = sorted(range(len(a)), key=lambda j: -sims[j])[:k]
            expected = np.zeros(7)
            for j in order:
                expected[int(train_y[j])] += np.exp(sims[j] / 0.07)
            np.testing.assert_allclose(scores[i].numpy(), expected, rtol=1e-3)


def test_weighted_vote_hand_computed():
    sims = torch.tensor([[0.07, 0.0, 0.0]])
    labels = torch.tensor([[1, 0, 0]])
    scores = weighted_knn_scores(sims, labels, 3, 0.07)
    np.testing.assert_allclose(scores.numpy(), [[2.0, np.e, 0.0]], rtol=1e-6)


def test_logistic_regression_matches_sklearn():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    y = (x @ rng.normal(size=(5, 3))).argmax(1)
    l2 = 0.05
    w, b = fit_logistic_regression(torch.tensor(x), torch.tensor(y), 3, l2)
    # sklearn minimises C * sum(CE) + ||W||^2 / 2, the same objective for C = 1 / (n * l2).
    ref = LogisticRegression(C=1 / (len(x) * l2), tol=1e-10, max_iter=10000).fit(x, y)
    ours = torch.softmax(torch.tensor(x) @ w + b, 1).numpy()
    np.testing.assert_allclose(ours, ref.predict_proba(x), atol=1e-4)


def test_linear_probe_separable_and_shuffled():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(10, 32, generator=g) * 4
    y = torch.randint(0, 10, (1000,), generator=g)
    x = centres[y] + torch.randn(1000, 32, generator=g)
    xtr, ytr, xte, yte = x[:800], y[:800], x[800:], y[800:]
    predict, _, _ = train_linear_fast(xtr, ytr, 10, (1e-4, 1e-2), 0.2, 300, seed=0)
    assert topk_accuracy(predict(xte), yte, (1,))[1] > 99
    shuffled = ytr[torch.randperm(800, generator=g)]
    predict, _, _ = train_linear_fast(xtr, shuffled, 10, (1e-4, 1e-2), 0.2, 300, seed=0)
    assert topk_accuracy(predict(xte), yte, (1,))[1] < 20  # chance is 10%


def test_stratified_holdout_never_empties_a_class():
    labels = np.array([0] * 10 + [1] * 2 + [2])
    held = stratified_holdout(labels, 0.2, seed=0)
    assert held[:10].sum() == 2 and held[10:12].sum() == 1 and not held[12]

