"""VOC AP against hand-computed cases; the SVM cost choice against scikit-learn's cross_val_score."""
import json

import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold, cross_val_score

from evaluate.run import cli
from tasks.metrics import voc_ap
from tasks.voc07_svm import Voc07SvmProtocol, _svm, choose_cost


def test_voc_ap_hand_computed():
    # ranks P N P N: recall 0.5 at precision 1, recall 1 at precision 2/3
    assert voc_ap([0.9, 0.8, 0.7, 0.6], [1, -1, 1, -1]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # a difficult-only image (0) is ignored wherever it ranks
    assert voc_ap([0.95, 0.9, 0.8, 0.7, 0.6], [0, 1, -1, 1, -1]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # ranks N P P: the interpolated precision at recall 0.5 is 2/3 (sklearn's non-interpolated AP gives 0.583)
    assert voc_ap([0.9, 0.8, 0.7], [-1, 1, 1]) == pytest.approx(2 / 3)
    assert np.isnan(voc_ap([0.1, 0.2], [-1, 0]))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_cost_choice_matches_sklearn_cross_validation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 6))
    y = np.where(x[:, 0] + 0.5 * rng.normal(size=90) > 0.3, 1, -1)
    p = Voc07SvmProtocol(costs=(0.01, 1.0, 100.0))
    cost, scores = choose_cost(x, y, p)
    for c in p.costs:
        ref = cross_val_score(_svm(c, p), x, y, cv=StratifiedKFold(3), scoring="average_precision").mean()
        assert scores[c] == pytest.approx(ref)
    assert cost == max(p.costs, key=lambda c: (scores[c], -c))


def test_voc07_svm_demo_record(tmp_path, capsys, demo_root):
    code = cli(["--ckpt", "random", "--arch", "resnet18", "--task", "voc07_svm", "--demo", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    rec = json.loads(next((tmp_path / "records").rglob("*.json")).read_text())
    assert 0 <= rec["metrics"]["voc07_svm_map"] <= 100
    aps = rec["data"]["ap_by_class"]
    assert len(aps) + len(rec["data"]["classes_without_positives"]) == 20
    assert rec["metrics"]["voc07_svm_map"] == pytest.approx(np.mean(list(aps.values())))
    assert set(rec["data"]["chosen_cost"].values()) <= set(Voc07SvmProtocol().costs)
