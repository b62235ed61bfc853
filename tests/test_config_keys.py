"""No config key is accepted and ignored: every key of config.py is read by the command that runs
(train.py or test.py, directly or through models.build_model) or refused there by
``config.validate_config``, also where another key's value would make it do nothing
(``REFUSED_WITH``: ``val_scans`` with ``val_interval=0``; ``supervoxel_source='generate'``,
``supervoxel_dir`` or ``n_sv`` with ``use_gt=True``).

Static check on the source: a key counts as read when it appears as ``config["key"]``,
``_config["key"]``, ``cfg["key"]`` or ``cfg.get("key"`` in the files the command runs, or is a
``ModelConfig`` field (``build_model`` receives the whole flat config). Keys read another way are
listed in ``READ_ELSEWHERE`` with the place that reads them; keys only refused are in ``REFUSED``.
A new key that nothing reads fails here, naming the key. Last, a key's default that depends on the
data: ``dataset=custom`` takes the prior thresholds from its ``dataset.json``'s modality.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from config import ex, validate_config
from dataloaders.eval_dataset import ProtocolKeys
from dataloaders.train_dataset import EpisodeKeys
from models.qamp import CT_PRIOR_THRESHOLDS, ModelConfig

REPO = Path(__file__).resolve().parents[1]
SOURCES = {  # files whose code runs for each command (the model files via build_model)
    "train": ["train.py", "engine/runtime.py", "models/__init__.py", "models/encoder.py", "dataloaders/train_dataset.py",
              "dataloaders/resolved.py"],
    "test": ["test.py", "engine/runtime.py", "models/__init__.py", "dataloaders/eval_dataset.py",
             "dataloaders/resolved.py"],
}
READ_ELSEWHERE = {  # key -> (commands, where it is read)
    "path": (("train", "test"), "config.RunFolderObserver creates the run folder under path['log_dir']"),
}
REFUSED = {  # key -> {command: a value validate_config refuses there}
    "n_way": {"train": 2, "test": 2},
    "n_query": {"train": 2, "test": 2},
    "n_shot": {"test": 3},
}
REFUSED_WITH = {  # key -> (command, a value, the other keys' values that make train.py ignore it)
    "val_scans": ("train", [3, 4], {"val_interval": 0}),
    "supervoxel_source": ("train", "generate", {"use_gt": True}),
    "supervoxel_dir": ("train", "/data/supervoxels_5000", {"use_gt": True}),
    "n_sv": ("train", 1000, {"use_gt": True}),
    "gin_prob": ("train", 1.0, {"augment": False}),
}
CASES = ([(key, command, value, {}) for key, values in REFUSED.items() for command, value in values.items()]
         + [(key, command, value, others) for key, (command, value, others) in REFUSED_WITH.items()])


def defaults() -> dict:
    return ex.configurations[0]()


def _access(key: str) -> re.Pattern:
    k = re.escape(key)
    return re.compile(rf"""\b_?(?:config|cfg)(?:\[\s*["']{k}["']\s*\]|\.get\(\s*["']{k}["'])""")


def readers(key: str) -> set[str]:
    """Commands whose code reads ``key``."""
    found = {cmd for cmd, files in SOURCES.items()
             if any(_access(key).search((REPO / f).read_text(encoding="utf-8"))
                    for f in files if (REPO / f).is_file())}
    if key in {f.name for f in dataclasses.fields(ModelConfig)}:
        found |= {"train", "test"}
    if key in {f.name for f in dataclasses.fields(EpisodeKeys)}:  # EpisodeKeys.from_config(config)
        found |= {"train"}
    if key in {f.name for f in dataclasses.fields(ProtocolKeys)}:  # ProtocolKeys.from_config(config)
        found |= {"test"}
    if key in READ_ELSEWHERE:
        found |= set(READ_ELSEWHERE[key][0])
    return found


@pytest.mark.parametrize("key", sorted(defaults()))
def test_every_config_key_is_read_or_refused(key: str) -> None:
    read_by = readers(key)
    refused_by = set(REFUSED.get(key, {}))
    assert read_by or refused_by, (
        f"config key {key!r} is accepted by config.py but read by neither train nor test (searched "
        f"config[{key!r}] / _config[...] / cfg[...] / cfg.get(...) in {sorted({f for v in SOURCES.values() for f in v})} "
        f"and the ModelConfig fields): read it where it should act, refuse it in "
        f"config.validate_config, or remove it (if it is read another way, add it to READ_ELSEWHERE here)")


@pytest.mark.parametrize("key,command,value,others", CASES)
def test_refused_keys_are_refused_with_the_key_named(key: str, command: str, value, others: dict,
                                                     tmp_path: Path) -> None:
    config = {**defaults(), key: value, **others, "path": {"log_dir": str(tmp_path / "runs")}}
    model = {"train": "qamp", "test": "copy_support"}  # copy_support: a test run without a snapshot
    expected = f"{key}={value!r} is " + ("set but" if others else "not supported")
    with pytest.raises(ValueError, match="^" + re.escape(expected)) as err:
        validate_config({**config, "model": model[command]}, command)
    for other, other_value in others.items():  # both keys named, and the fix
        assert f"{other}={other_value!r}" in str(err.value) and f"drop {key}" in str(err.value), str(err.value)
    assert not (tmp_path / "runs").exists()  # refused before anything is created
    refused_at = set(REFUSED.get(key, {})) | {command}
    for other_command in sorted(set(model) - refused_at):  # a command that does not read the key takes it
        validate_config({**config, "model": model[other_command]}, other_command)


def test_keys_refused_together_pass_alone(tmp_path: Path) -> None:
    config = {**defaults(), "path": {"log_dir": str(tmp_path)}}
    validate_config({**config, "val_scans": [3, 4], "val_interval": 500}, "train")
    validate_config({**config, "supervoxel_source": "generate"}, "train")
    validate_config({**config, "use_gt": True}, "train")  # the default supervoxel_source='folder'
    # a resumed run keeps its val_scans and may switch validation off (val_interval is resume-free)
    validate_config({**config, "val_scans": [3, 4], "val_interval": 0, "resume": str(tmp_path)}, "train")


@pytest.mark.parametrize("name", sorted(ex.named_configs))
def test_named_configs_pass_the_train_checks(name: str, tmp_path: Path) -> None:
    config = ex.run("print_config", {"path": {"log_dir": str(tmp_path)}}, named_configs=[name]).config
    validate_config(config, "train")


def test_n_shot_at_test_points_to_n_part(tmp_path: Path) -> None:
    config = {**defaults(), "n_shot": 3, "path": {"log_dir": str(tmp_path)}, "model": "copy_support"}
    with pytest.raises(ValueError, match="n_part"):
        validate_config(config, "test")
    validate_config({**config, "n_shot": 1}, "test")
    validate_config({**config, "model": "qamp", "n_shot": 3}, "train")  # training with 3 shots works


def test_the_check_notices_an_unread_key() -> None:
    assert readers("n_steps") == {"train"} and "test" in readers("supp_idx")
    assert readers("no_such_key_anywhere") == set()


def test_custom_dataset_json_modality_sets_the_prior_thresholds(tmp_path: Path, capsys) -> None:
    """dataset=custom: dataset.json's modality CT gives the CT thresholds (print_config shows them);
    MR, or no dataset.json in data_dir, the MR defaults; given values win."""
    (tmp_path / "dataset.json").write_text('{"modality": "CT", "labels": {"1": "liver"}}', encoding="utf-8")
    updates = {"dataset": "custom", "data_dir": str(tmp_path), "path": {"log_dir": str(tmp_path / "runs")}}

    def thresholds(**more) -> tuple[float, float]:
        config = ex.run("print_config", {**updates, **more}).config
        return config["tau_fg"], config["tau_bg"]

    capsys.readouterr()
    assert thresholds() == CT_PRIOR_THRESHOLDS
    assert f"tau_fg = {CT_PRIOR_THRESHOLDS[0]}" in capsys.readouterr().out
    assert thresholds(tau_fg=0.55) == (0.55, CT_PRIOR_THRESHOLDS[1])
    mr = (ModelConfig.tau_fg, ModelConfig.tau_bg)
    assert thresholds(data_dir=str(tmp_path / "no_such_folder")) == mr
    (tmp_path / "dataset.json").write_text('{"labels": {"1": "liver"}}', encoding="utf-8")  # modality MR by default
    assert thresholds() == mr


def test_training_only_keys_are_the_keys_only_training_reads() -> None:
    """engine.snapshot_config.TRAINING_ONLY_KEYS (test.py refuses them on its command line) holds every
    key that only train.py's code reads, and only config keys test.py does not need; a new training key
    fails here until it is listed."""
    from engine.snapshot_config import TRAINING_ONLY_KEYS

    keys = defaults()
    assert set(TRAINING_ONLY_KEYS) <= set(keys) and len(set(TRAINING_ONLY_KEYS)) == len(TRAINING_ONLY_KEYS)
    refused_at_test = {key for key, commands in REFUSED.items() if "test" in commands}  # n_shot: test.py's 1 only
    only_train = {key for key in keys if readers(key) == {"train"}} - refused_at_test
    assert only_train <= set(TRAINING_ONLY_KEYS), sorted(only_train - set(TRAINING_ONLY_KEYS))
    # read by test.py's files only to validate or ignore them: resolve_labels checks exclude_label, the
    # model is built with pretrained_weights='none' (its weights come from the snapshot), and
    # dataloaders.resolved.resolve_dataset (one resolver for both commands) checks the pseudo-label
    # keys and keeps them in the resolved dataset, which only TrainDataset reads
    assert set(TRAINING_ONLY_KEYS) - only_train == {"exclude_label", "pretrained_weights", "pretrained_path",
                                                    "supervoxel_dir", "n_sv", "exclude_mode", "supervoxel_source",
                                                    "use_gt"}


def test_one_ct_threshold_rule(tmp_path: Path) -> None:
    """models.qamp.prior_thresholds(modality) is the rule; data.registry.dataset_modality the fact."""
    from data.registry import dataset_modality
    from models.qamp import prior_thresholds

    assert prior_thresholds("CT") == CT_PRIOR_THRESHOLDS
    assert prior_thresholds("MR") == prior_thresholds(None) == (ModelConfig.tau_fg, ModelConfig.tau_bg)
    assert dataset_modality("SABS") == "CT" and dataset_modality("CHAOST2") == "MR"
    assert dataset_modality("no_such_dataset") is None and dataset_modality("custom", tmp_path) is None
    (tmp_path / "dataset.json").write_text('{"modality": "CT", "labels": {"1": "liver"}}', encoding="utf-8")
    assert dataset_modality("custom", tmp_path) == "CT"
    config = ex.run("print_config", {"dataset": "SABS", "path": {"log_dir": str(tmp_path / "runs")}}).config
    assert (config["tau_fg"], config["tau_bg"]) == prior_thresholds("CT")
