"""A collapsed run (validation predicts background on every query of every class, twice in a row,
after a validation that predicted foreground: a slow start is not a collapse) stops with an error naming the steps, the method and the fix; the thresholds are logged."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import experiment, tiny_train_config


def point(step: int, collapsed: bool) -> dict:
    dice = {"LIVER": 0.0, "SPLEEN": 0.0 if collapsed else 0.4}
    return {"step": step, "dice": dice, "mean": sum(dice.values()) / 2,
            "all_background": ["LIVER", "SPLEEN"] if collapsed else ["LIVER"]}


def test_check_collapse_needs_patience_validations_in_a_row_on_every_class() -> None:
    from train import check_collapse

    check_collapse([point(0, False), point(500, True)], 2, "adnet")  # one is not enough
    check_collapse([point(0, False), point(500, True), point(1000, False)], 2, "adnet")  # one class still segmented
    check_collapse([point(0, False), point(500, True), point(1000, True)], 0, "adnet")  # patience 0: never stop
    with pytest.raises(RuntimeError, match=r"model='adnet' collapsed: .* at steps 500, 1000 .*collapse_patience=0"):
        check_collapse([point(0, False), point(500, True), point(1000, True)], 2, "adnet")


def test_a_slow_start_is_not_a_collapse() -> None:
    """All background before any validation predicted foreground is a slow start (QAMP from a random
    encoder at step 500), however long it lasts; counting starts after the first foreground."""
    from train import check_collapse

    check_collapse([point(500, True), point(1000, True), point(1500, True)], 2, "qamp")  # never stopped
    check_collapse([point(500, True), point(1000, False), point(1500, True)], 2, "qamp")  # one after: not yet
    with pytest.raises(RuntimeError, match=r"at steps 1500, 2000 "):
        check_collapse([point(500, True), point(1000, False), point(1500, True), point(2000, True)], 2, "qamp")


def test_training_stops_at_the_second_all_background_validation(phantoms48: Path, tmp_path: Path,
                                                                monkeypatch) -> None:
    import train

    ex = experiment()
    calls = []

    def all_background(model, vds, test_label, label_names, config, device):  # foreground only at step 1
        calls.append(1)
        if len(calls) == 1:
            return {"dice": {label_names[c]: 0.3 for c in test_label}, "mean": 0.3, "all_background": []}
        return {"dice": {label_names[c]: 0.0 for c in test_label}, "mean": 0.0,
                "all_background": [label_names[c] for c in test_label]}

    monkeypatch.setattr(train, "validate", all_background)
    config = tiny_train_config(phantoms48, tmp_path, n_steps=5, val_interval=1, save_snapshot_every=5)
    with pytest.raises(RuntimeError, match=r"model='qamp' collapsed: .* at steps 2, 3 "):
        ex.run("train", config_updates=config)
    assert len(calls) == 3  # stopped at the second all-background validation after foreground, not at the end
    run_dir = next(tmp_path.glob("train_*"))
    assert json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["status"] == "FAILED"
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert len(metrics["threshold"]["values"]) == 3  # QAMP's mean query threshold, logged every step


def test_collapse_patience_without_validation_is_refused(phantoms48: Path, tmp_path: Path) -> None:
    ex = experiment()
    config = tiny_train_config(phantoms48, tmp_path, val_interval=0, collapse_patience=3)
    with pytest.raises(ValueError, match="collapse_patience=3 is set but val_interval=0"):
        ex.run("train", config_updates=config)
