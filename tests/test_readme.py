"""Every command in the README exists as written: each fenced ``bash`` line (and inline ``python ...``
/ ``bash ...`` span) is checked against the real command line: scripts exist and parse, Sacred
commands, named configs and keys exist, and every ``--option`` appears in the program's ``--help``;
every ``$VARIABLE`` a block uses is set at the top of that block (``export NAME=...`` or ``NAME=...``),
so that each block runs as pasted.
(The commands themselves are run by the other tests and by ``scripts/demo.sh``.)"""
from __future__ import annotations

import functools
import importlib.util
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from helpers import cli_help, experiment as sacred_experiment

REPO = Path(__file__).resolve().parents[1]

SACRED_SCRIPTS = ("train.py", "test.py")
SUBCOMMAND_MODULES = ("data.preprocess",)  # their first argument selects a sub-parser


def readme_blocks(text: str) -> list[tuple[list[str], list[str]]]:
    """Per fenced ``bash`` block: its commands (variables it sets expanded) and the variables it uses
    without setting them first."""
    blocks = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        commands, variables, unset = [], {}, []
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            used = re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", re.sub(r"^export [A-Z_][A-Z0-9_]*=\S+$", "", line))
            unset += [name for name in used if name not in variables]  # an export's value may use the environment
            for name, value in variables.items():
                line = line.replace(f"${name}", value)
            assignment = re.fullmatch(r'(?:export )?([A-Z_][A-Z0-9_]*)=(".*"|\S+)', line)
            if assignment:  # a shell variable the next lines use (e.g. GRID="..."): expanded there
                variables[assignment.group(1)] = assignment.group(2).strip('"')
                continue
            if line:
                commands.append(line)
        blocks.append((commands, unset))
    return blocks


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    commands = [command for block, _ in readme_blocks(text) for command in block]
    for span in re.findall(r"`([^`\n]+)`", text):
        if re.match(r"^([A-Z_]+=\S+ )*(python|bash) \S", span):
            commands.append(span)
    return commands


def split(command: str) -> list[str]:
    """Tokens without leading ``VAR=value`` assignments."""
    tokens = shlex.split(command)
    while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):
        tokens.pop(0)
    return tokens


@functools.lru_cache(maxsize=None)
def experiment():
    ex = sacred_experiment()
    return ex, dict(ex.configurations[0]())


def check_sacred(script: str, args: list[str]) -> None:
    ex, config = experiment()
    commands = dict(ex.gather_commands())
    if args and args[0] != "with" and not args[0].startswith("-"):
        assert args[0] in commands, f"{script}: unknown command {args[0]!r}"
        args = args[1:]
    if not args:
        return
    assert args[0] == "with", f"{script}: expected 'with' before the updates, got {args}"
    for token in args[1:]:
        if token.startswith("-"):
            break
        if "=" in token:
            path = token.split("=", 1)[0].split(".")
            node = config
            for part in path:
                assert isinstance(node, dict) and part in node, f"{script}: unknown config key {token!r}"
                node = node[part]
        else:
            assert token in ex.named_configs, f"{script}: unknown named config {token!r}"


def check_command(command: str) -> None:
    tokens = split(command)
    assert tokens, command
    if tokens[0] == "torchrun":  # torchrun [its options] script.py [args]: check the script's part
        script = next(i for i, t in enumerate(tokens) if t.endswith(".py"))
        tokens = ["python", *tokens[script:]]
    if tokens[0] == "bash":
        script = REPO / tokens[1]
        assert script.is_file(), f"{tokens[1]} does not exist"
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, f"{tokens[1]} does not parse"
        return
    assert tokens[0] == "python", command
    if tokens[1] == "-m":
        module, args = tokens[2], tokens[3:]
        program = ("-m", module)
        assert importlib.util.find_spec(module) is not None, f"no module {module}"
    else:
        script, args = tokens[1], tokens[2:]
        assert (REPO / script).is_file(), f"{script} does not exist"
        if script in SACRED_SCRIPTS:
            check_sacred(script, args)
            return
        program = (script,)
    if program[-1] in SUBCOMMAND_MODULES and args and not args[0].startswith("-"):
        program, args = (*program, args[0]), args[1:]
    options = [a.split("=", 1)[0] for a in args if a.startswith("--")]
    text = cli_help(*program)
    for option in options:
        assert re.search(rf"(^|[\s,\[]){re.escape(option)}\b", text), f"{' '.join(program)}: no option {option}"


def test_readme_blocks_set_the_variables_they_use() -> None:
    """No block depends on a variable set elsewhere (an unset `$DATA` expanded to `data_dir=`)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    unset = {i: names for i, (_, names) in enumerate(readme_blocks(text)) if names}
    assert not unset, f"README bash blocks (by index) use variables they do not set at their top: {unset}"
    assert readme_blocks("```bash\nexport QAMP_DATA_ROOT=$HOME/data\npython train.py with data_dir=$QAMP_DATA_ROOT\n```"
                         )[0][1] == []  # the export's own value may use the environment
    assert readme_blocks("```bash\nGRID=\"data_dir=$DATA\"\npython -m tools.sweep $GRID\n```")[0][1] == ["DATA"]


def test_readme_has_commands() -> None:
    commands = readme_commands()
    assert "bash scripts/demo.sh" in commands and "bash scripts/test.sh" in commands
    assert any(c.startswith("python train.py") for c in commands)


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_matches_the_real_command_line(command: str) -> None:
    check_command(command)


def test_the_checker_catches_a_wrong_command() -> None:
    with pytest.raises(AssertionError, match="unknown named config"):
        check_command("python train.py with no_such_config")
    with pytest.raises(AssertionError, match="unknown config key"):
        check_command("python train.py with optim.no_such_key=1")
    with pytest.raises(AssertionError, match="no option --no-such-option"):
        check_command("python -m tools.summarize runs --no-such-option")
