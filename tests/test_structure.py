"""The code reads as one piece: one dataset registry, layered imports without circles, the command
lines without Sacred warnings, every pinned requirement used. No external data."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from helpers import experiment

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PACKAGES = ("data", "dataloaders", "models", "utils", "engine", "tools")
# Layers, lowest first: a package imports only packages before it (and itself). utils: small helpers;
# data: the registry, dataset.json, pre-processing, supervoxels; dataloaders: scans and episodes;
# models: the networks; engine: run machinery; tools: command-line tools over runs. The top-level
# scripts (config, train, test, predict) may import any package; test.py never imports train.py.
LAYERS = ("utils", "data", "dataloaders", "models", "engine", "tools")
SCRIPTS = ("config.py", "train.py", "test.py")


def project_modules() -> dict[str, Path]:
    """Module name -> file of every project module (packages and the top-level scripts)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if path.name == "setup.py":
                continue
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    for script in SCRIPTS:
        modules[f"script:{script[:-3]}"] = REPO / script
    return modules


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name in ("train", "test", "config"):
                found.add(f"script:{name}")
            elif name in known:
                found.add(name)
    return found


def test_one_dataset_registry_for_preprocessing_verify_and_loaders() -> None:
    import data.preprocess.common as common
    import data.preprocess.verify as verify
    import dataloaders.datasets as loaders
    from data.registry import DATASETS, DatasetSpec

    assert common.DATASETS is DATASETS and verify.DATASETS is DATASETS and loaders.DATASETS is DATASETS
    assert common.DatasetSpec is DatasetSpec and loaders.DatasetSpec is DatasetSpec
    # classmap names as in the published folders; derived from the label names unless given
    assert DATASETS["CHAOST2"].class_names == {0: "BG", 1: "LIVER", 2: "RK", 3: "LK", 4: "SPLEEN"}
    assert DATASETS["CMR"].class_names == {0: "BG", 200: "LV-MYO", 500: "LV-BP", 600: "RV"}
    assert DATASETS["SABS"].class_names[0] == "BGD" and DATASETS["SABS"].class_names[3] == "KID_l"
    for spec in DATASETS.values():
        stored = {spec.label_remap.get(v, v) for v in spec.class_names if v != 0}
        assert stored == set(spec.label_names), spec.name
        assert set(spec.test_labels) <= set(spec.label_names) and len(spec.folds) == 5, spec.name


def test_every_package_imports_only_the_layers_below_it_and_there_is_no_import_circle() -> None:
    modules = project_modules()
    known = set(modules)
    graph = {name: imported_modules(path, known) for name, path in modules.items()}
    assert set(PACKAGES) == set(LAYERS)
    upward = []
    for name, deps in graph.items():
        package = name.split(".")[0]
        if package.startswith("script:"):
            continue
        allowed = set(LAYERS[:LAYERS.index(package) + 1])
        upward += [f"{name} -> {d}" for d in sorted(deps) if d.split(".")[0] not in allowed]
    assert not upward, f"imports from a higher layer: {upward}"
    assert "script:train" not in graph["script:test"], "test.py must not import train.py"

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(graph[name]):
            if dep == name or name.startswith(dep + "."):  # a module importing its own package
                continue
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_no_citation_of_documents_outside_the_repository() -> None:
    offenders = []
    for path in REPO.rglob("*"):
        if path.suffix not in (".py", ".pyx", ".sh", ".md") or ".git" in path.parts or ".venv" in path.parts:
            continue
        if "QAMP_REFERENCE" in path.read_text(errors="replace", encoding="utf-8") and path.name != "test_structure.py":
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders, f"cite docs/METHOD.md instead: {offenders}"
    method = (REPO / "docs" / "METHOD.md").read_text(encoding="utf-8")
    for path in REPO.rglob("*.py"):
        for section in re.findall(r"docs/METHOD\.md §(\d+(?:\.\d+)?)", path.read_text(encoding="utf-8")):
            assert f"## {section} " in method or f"### {section} " in method, (path, section)


# Distribution name in requirements.txt -> the module the code imports.
IMPORT_NAMES = {"SimpleITK": "SimpleITK", "opencv-python-headless": "cv2", "scikit-image": "skimage",
                "pillow": "PIL", "cython": "Cython", "setuptools": "setuptools"}
INDIRECT = {"setuptools": "pkg_resources for sacred 0.8.7", "cython": "data/supervoxels/setup.py builds the .pyx",
            "cloudpickle": "submitit's serialiser (tools/sweep.py --executor slurm / submitit-local)",
            "sqlalchemy": "Sacred's SqlObserver (-s sqlite:///runs.db)",
            "pytest-xdist": "scripts/test.sh runs pytest -n auto", "execnet": "pytest-xdist's transport"}


def test_every_pinned_requirement_is_used() -> None:
    sources = [p for p in REPO.rglob("*.py") if ".venv" not in p.parts and ".git" not in p.parts]
    text = "\n".join(p.read_text(encoding="utf-8") for p in sources)
    for line in (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        dist = line.split("=")[0].split(">")[0].split("<")[0].strip()
        if dist in INDIRECT:
            if dist == "pytest-xdist":
                assert "pytest -q -n auto" in (REPO / "scripts" / "test.sh").read_text(encoding="utf-8")
            continue
        module = IMPORT_NAMES.get(dist, dist.replace("-", "_"))
        assert f"import {module}" in text or f"from {module}" in text, f"{dist} is pinned but never imported"


def test_named_configs_add_no_stray_entries_and_keep_their_docs() -> None:
    from config import ex

    base = set(ex.configurations[0]())
    for name, scope in ex.named_configs.items():
        entries = set(scope())
        assert "__doc__" not in entries, name
        assert entries <= base, f"named config {name} adds {sorted(entries - base)}"
        assert scope.__doc__, f"named config {name} has no docstring"


def run_sacred_cli(argv: list[str], capsys) -> str:
    """``python <argv>`` for train.py / test.py, run in this process (``config.run_commandline``, as
    their ``__main__`` block calls it): what it prints and every WARNING the experiment logs."""
    import logging

    from config import ex, run_commandline

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("qamp", "sacred", "")]
    for logger in loggers:
        logger.addHandler(handler)
    default_command, sys_argv, sys.argv = ex.default_command, sys.argv, list(argv)  # Sacred reads sys.argv[0]
    try:
        run_commandline(argv, argv[0][:-3])
    except SystemExit as stop:
        assert stop.code in (0, None), f"{' '.join(argv)} exited with {stop.code}"
    finally:
        ex.default_command, sys.argv = default_command, sys_argv
        for logger in loggers:
            logger.removeHandler(handler)
    captured = capsys.readouterr()
    return captured.out + captured.err + "".join(f"WARNING - {r.getMessage()}\n" for r in records)


@pytest.mark.parametrize("script", ["train.py", "test.py"])
def test_help_shows_the_program_and_sacreds_commands_without_warnings(script: str, capsys) -> None:
    experiment()
    out = run_sacred_cli([script, "--help"], capsys)
    assert out.startswith("Usage:\n"), out[:200]
    assert f"  {script} [(with UPDATE...)] [options]" in out
    for command in ("print_config", "print_named_configs", script[:-3]):
        assert f"  {command} " in out, command
    assert "Warning" not in out and "unmatched" not in out and "dummy" not in out, out[:500]


def test_print_config_with_named_configs_warns_nothing(capsys) -> None:
    experiment()
    out = run_sacred_cli(["train.py", "print_config", "with", "abd_ct", "setting2", "cpu_budget"], capsys)
    assert "WARNING" not in out and "__doc__" not in out, out[:1000]
    assert "tau_fg = 0.7" in out and "# prior threshold for query foreground samples" in out


MAX_FUNCTION_LINES = 60


def long_functions(source: str) -> list[tuple[str, int, bool]]:
    """``(name, lines, marked)`` of every function longer than ``MAX_FUNCTION_LINES`` (``def`` to its
    last line, docstring included); ``marked``: the comment block right above it (or its decorators)
    says why it reads straight through."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length <= MAX_FUNCTION_LINES:
                continue
            first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 2  # 0-based line above
            comments = []
            while first >= 0 and lines[first].strip().startswith("#"):
                comments.append(lines[first])
                first -= 1
            found.append((node.name, length, any("straight through" in c.lower() for c in comments)))
    return found


def test_no_long_function_unless_it_reads_straight_through() -> None:
    """Every function of the product (not the tests) fits in 60 lines, or a comment above it says
    why it reads straight through."""
    unmarked = []
    for path in sorted(REPO.rglob("*.py")):
        parts = path.relative_to(REPO).parts
        if parts[0] in ("tests", ".venv", ".git"):
            continue
        for name, length, marked in long_functions(path.read_text(encoding="utf-8")):
            if not marked:
                unmarked.append(f"{path.relative_to(REPO)}: {name} ({length} lines)")
    assert not unmarked, ("functions over 60 lines without a '# Straight through: <why>' comment above them: "
                          + "; ".join(unmarked))
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert long_functions(f"def f():\n{body}\n") == [("f", MAX_FUNCTION_LINES + 1, False)]
    assert long_functions(f"# Straight through: a list\n@dec\ndef f():\n{body}\n") == [("f", 61, True)]


def test_supervoxel_pool_uses_public_api_only() -> None:
    """_run_pool knows its workers through multiprocessing.active_children, not the pool's privates."""
    source = (REPO / "data" / "supervoxels" / "generate_supervoxels.py").read_text(encoding="utf-8")
    assert "_processes" not in source and "active_children" in source
