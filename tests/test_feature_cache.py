"""The feature cache heals: a truncated, empty or foreign `.cache/features/*.pt` is reported in one warning line,
removed and extracted again, and the record is the cold run's."""
import json

import pytest
import torch

from evaluate.run import cli

ARGS = ["--ckpt", "random", "--arch", "resnet18", "--task", "knn_stl10", "--demo",
        "--set", "resize=36", "--set", "crop=32"]


@pytest.fixture
def own_cache(tmp_path, monkeypatch, demo_root):
    """A feature cache of this test alone, beside the session's demo data."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / demo_root.parent.name).symlink_to(demo_root.parent)
    monkeypatch.setenv("SSL_SUITE_CACHE", str(cache))
    return cache / "features"


def run_record(out, capsys):
    assert cli(ARGS + ["--out", str(out)]) == 0
    text = capsys.readouterr().out
    return json.loads(next((out / "records").rglob("*.json")).read_text()), text


@pytest.mark.parametrize("how", ["truncated", "empty", "not a cache"])
def test_damaged_cache_file_is_reported_removed_and_extracted_again(tmp_path, capsys, own_cache, how):
    cold, _ = run_record(tmp_path / "cold", capsys)
    files = sorted(own_cache.glob("*.pt"))
    assert cold["data"]["feature_cache"] == {"train": "miss", "test": "miss"} and len(files) == 2
    good = {f: torch.load(f, weights_only=True) for f in files}
    for f in files:
        data = f.read_bytes()
        f.write_bytes({"truncated": data[: len(data) // 2], "empty": b""}.get(how, b"PK\x03\x04 something else"))
    healed, text = run_record(tmp_path / "healed", capsys)
    warnings = [line for line in text.splitlines() if "unreadable" in line]
    assert len(warnings) == 2 and all("warning" in w and "removed" in w for w in warnings), text
    assert "Traceback" not in text
    assert healed["metrics"] == cold["metrics"] and healed["data"] == cold["data"]
    for f, entry in good.items():  # written again, as the cold run wrote them
        again = torch.load(f, weights_only=True)
        assert set(again) == set(entry) and all(torch.equal(again[k], v) for k, v in entry.items() if k != "skipped")
    warm, text = run_record(tmp_path / "warm", capsys)
    assert warm["data"]["feature_cache"] == {"train": "hit", "test": "hit"} and "unreadable" not in text
    assert warm["metrics"] == cold["metrics"]
