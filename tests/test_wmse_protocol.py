"""Table 1's protocol against W-MSE's own pipeline (htdt/self-supervised): torchvision's STL10 reader on the
official binary files, W-MSE's test transform, its encoder stem, its kNN rule (eval/knn.py) and its linear probe
(eval/sgd.py), the last two written out from W-MSE's source and run on fixed features."""
import json

import numpy as np
import pytest
import torch
import torchvision
from torchvision import transforms as T

from evaluate.run import cli


def wmse_encoder(seed=0):
    """W-MSE's get_model for STL-10: torchvision's ResNet-18, conv1 3x3 stride 1 without bias, max-pool kept."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18()
    model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.fc = torch.nn.Identity()
    return model.eval()


class STL10Files(torchvision.datasets.STL10):
    """torchvision's reader; the demo files are not the release's, so their checksums are not checked."""

    def _check_integrity(self):
        return True


def wmse_features(model, root, split, first=None):
    """W-MSE's test features of the split (of its `first` images only, when given; the labels of all)."""
    test_transform = T.Compose([T.Resize(70, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(64),
                                T.ToTensor(), T.Normalize((0.43, 0.42, 0.39), (0.27, 0.26, 0.27))])
    data = STL10Files(str(root), split=split, transform=test_transform, download=False)
    labels = torch.as_tensor(data.labels, dtype=torch.long)
    if first is not None:
        data = torch.utils.data.Subset(data, range(first))
    loader = torch.utils.data.DataLoader(data, batch_size=50, shuffle=False)
    with torch.no_grad():
        features = torch.cat([model(x) for x, _ in loader])
    return features, labels


def wmse_eval_knn(x_train, y_train, x_test, y_test, k=5):
    """W-MSE's eval/knn.py, written out: Euclidean distance, majority vote by unique counts and argmax."""
    d = torch.cdist(x_test, x_train)
    labels = y_train[torch.topk(d, k=k, dim=1, largest=False).indices]
    pred = torch.empty_like(y_test)
    for i in range(len(labels)):
        values, counts = labels[i].unique(return_counts=True)
        pred[i] = values[counts.argmax()]
    return (pred == y_test).float().mean().item()


def test_knn_stl10_wmse_gives_wmse_pipelines_features_and_accuracy(tmp_path, demo_root):
    model = wmse_encoder()
    ckpt = tmp_path / "wmse_r18.pth"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "out"
    assert cli(["--ckpt", str(ckpt), "--task", "knn_stl10", "--demo", "--no-report", "--set", "protocol=wmse",
                "--set", "save_features=true", "--out", str(out)]) == 0
    path = next((out / "records").rglob("*.json"))
    rec = json.loads(path.read_text())
    assert rec["checkpoint"]["stem"] == "3x3" and rec["probe"]["probe"] == "knn:wmse"
    assert rec["protocol"]["k"]["value"] == [5] and "eval/knn.py" in rec["protocol"]["k"]["source"]
    saved = np.load(path.with_name(path.stem + ".features.npz"))

    # W-MSE's features of the first 50 images of each split (a third of the time of all 400), its labels of all;
    # its kNN rule then on the saved features, checked against those rows
    x_train, y_train = wmse_features(model, demo_root / "stl10", "train", first=50)
    x_test, y_test = wmse_features(model, demo_root / "stl10", "test", first=50)
    np.testing.assert_allclose(saved["train_x"][:50], x_train.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(saved["test_x"][:50], x_test.numpy(), rtol=1e-4, atol=1e-5)
    assert (saved["train_y"] == y_train.numpy()).all() and (saved["test_y"] == y_test.numpy()).all()
    expected = 100 * wmse_eval_knn(*(torch.from_numpy(saved[k]) for k in ("train_x", "train_y", "test_x", "test_y")))
    assert rec["metrics"] == {"stl10_knn5_top1": pytest.approx(expected)}


def test_majority_vote_ties_go_to_the_smallest_label():
    from tasks.knn import majority_vote_knn

    train = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    labels = torch.tensor([3, 1, 3, 1, 0])
    # the 4 nearest of 1.5: two of class 1 and two of class 3 -> class 1 (W-MSE: unique() sorts, argmax takes the first)
    assert majority_vote_knn(train, labels, torch.tensor([[1.5]]), 4, 4).tolist() == [1]
    assert wmse_eval_knn(train, labels, torch.tensor([[1.5]]), torch.tensor([1]), k=4) == 1.0


def wmse_eval_sgd(x_train, y_train, x_test, y_test, epoch, batch=1000):
    """W-MSE's eval/sgd.py eval_sgd after get_data, written out (its batch of 1000 a parameter here): Adam 1e-2,
    weight decay 5e-6, ExponentialLR towards 1e-6 stepped per epoch, torch.randperm(...).view(-1, batch)."""
    lr_start, lr_end = 1e-2, 1e-6
    gamma = (lr_end / lr_start) ** (1 / epoch)
    num_class = y_train.max().item() + 1
    clf = torch.nn.Linear(x_train.shape[1], num_class)
    clf.train()
    optimizer = torch.optim.Adam(clf.parameters(), lr=lr_start, weight_decay=5e-6)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
    criterion = torch.nn.CrossEntropyLoss()
    for _ in range(epoch):
        perm = torch.randperm(len(x_train)).view(-1, batch)
        for idx in perm:
            optimizer.zero_grad()
            criterion(clf(x_train[idx]), y_train[idx]).backward()
            optimizer.step()
        scheduler.step()
    clf.eval()
    with torch.no_grad():
        y_pred = clf(x_test)
    return clf, (y_pred.argmax(1) == y_test).float().mean().item()


def fixed_features(n_train, n_test, d, classes, seed):
    """Train and test features around one class centre each: a problem a linear probe learns part of."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g)
    out = []
    for n in (n_train, n_test):
        y = torch.arange(n) % classes
        out += [centres[y] + 1.5 * torch.randn(n, d, generator=g), y]
    return out


def test_linear_wmse_is_wmse_eval_sgd_on_fixed_features():
    """protocol=wmse's probe against W-MSE's eval_sgd on the same fixed features, seeded the same way: the same
    weights and test accuracy (the same float32 operations in the same order)."""
    from tasks.linear import LinearProtocol, train_linear_wmse
    from tasks.metrics import topk_accuracy

    xtr, ytr, xte, yte = fixed_features(120, 80, 16, 4, seed=3)
    p = LinearProtocol(num_classes=4, wmse_batch_size=40, wmse_epochs=20)
    clf, history, used = train_linear_wmse(xtr, ytr, 4, p, seed=5)
    assert used == 120 and len(history) == 20
    assert history[-1]["lr"] == pytest.approx(1e-2 * (1e-6 / 1e-2) ** (19 / 20))
    torch.manual_seed(5)
    ref, ref_acc = wmse_eval_sgd(xtr, ytr, xte, yte, epoch=20, batch=40)
    torch.testing.assert_close(clf.weight, ref.weight, rtol=0, atol=0)
    torch.testing.assert_close(clf.bias, ref.bias, rtol=0, atol=0)
    with torch.no_grad():
        assert topk_accuracy(clf(xte), yte, (1,))[1] == pytest.approx(100 * ref_acc)
    assert 30 < 100 * ref_acc < 100  # the probe learnt something and the features are not trivially separable


@pytest.mark.parametrize("k", [4, 5, 20])
def test_majority_vote_knn_is_wmse_eval_knn_on_fixed_features(k):
    """The kNN of protocol=wmse against W-MSE's eval_knn on fixed features whose votes tie often (4 classes)."""
    from tasks.knn import majority_vote_knn

    xtr, ytr, xte, yte = fixed_features(300, 200, 8, 4, seed=6)
    ours = majority_vote_knn(xtr, ytr, xte, k, 4, chunk=64)
    d = torch.cdist(xte.double(), xtr.double())  # W-MSE's float32 distances in double: no near-ties reordered
    labels = ytr[torch.topk(d, k=k, dim=1, largest=False).indices]
    counts = torch.stack([(labels == c).sum(1) for c in range(4)], 1)
    ties = ((counts == counts.max(1, keepdim=True).values).sum(1) > 1).sum().item()
    assert ties > 5  # the rule for equal votes is exercised
    assert 100 * (ours == yte).double().mean().item() == pytest.approx(
        100 * wmse_eval_knn(xtr.double(), ytr, xte.double(), yte, k=k))
    for i in range(len(labels)):  # and per query, W-MSE's unique(return_counts) then argmax
        values, n = labels[i].unique(return_counts=True)
        assert ours[i] == values[n.argmax()]


def test_linear_stl10_wmse_end_to_end(tmp_path, demo_root):
    out = tmp_path / "lin"
    assert cli(["--ckpt", "random", "--arch", "resnet18", "--task", "linear_stl10", "--demo", "--set", "protocol=wmse",
                "--out", str(out)]) == 0
    rec = json.loads(next((out / "records").rglob("*.json")).read_text())
    assert rec["probe"]["probe"] == "linear:wmse" and set(rec["metrics"]) == {"stl10_linear_top1", "stl10_linear_top5"}
    assert len(rec["data"]["history"]) == rec["protocol"]["wmse_epochs"]["value"] == 100
    assert rec["data"]["train_rows_used"] == 300  # 300 demo train images, batches of 60
