"""Docs that cannot drift: every `python -m ayt...` command in a bash block of README.md and
docs/*.md is run as its dry run (`--cfg` for training runs and studies, argument parsing for
the benchmark and cluster commands, `--help` for the importer), in-process, from a fresh
directory, and must resolve. Commands that need files only a cluster has (their arguments name
`$VARIABLES` or `<placeholders>`) are listed and skipped by that rule, nothing else.

Mutation caught: a renamed config key left in a docs command (e.g. `study.protocol.tune.points`
renamed), a study or benchmark that no longer exists, a command whose dry run exits non-zero."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```bash\n(.*?)```", re.S)
PLACEHOLDER = re.compile(r"\$\w|<[\w-]+>|\.\.\.")


def _commands() -> list[tuple[str, str]]:
    """(where, command) of every `python -m ayt...` line of every bash block, continuations joined;
    a command whose line names a placeholder anywhere (its environment included) keeps it."""
    found = []
    for doc in DOCS:
        for block in BLOCK.findall(doc.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #", 1)[0].strip()
                for part in re.split(r"\s*&&\s*", line):
                    start = part.find("python -m ayt")
                    if start >= 0:
                        needs = " <cluster>" if PLACEHOLDER.search(part[:start]) else ""
                        found.append((doc.name, part[start:].strip().rstrip(";") + needs))
    return found


COMMANDS = _commands()


def test_the_docs_have_commands_to_check():
    assert len(COMMANDS) >= 20, COMMANDS
    assert any(c.startswith("python -m ayt.studies.batch_size_sweep") for _, c in COMMANDS)


def _dry_run(argv: list[str]) -> int:
    module, args = argv[2], argv[3:]
    if module == "ayt.train":
        from ayt.train import main
        return main([*args, "--cfg"])
    if module == "ayt.studies":
        from ayt.studies.engine.cli import main
        return main([*args, "--cfg"])
    if module.startswith("ayt.studies."):
        name = module.split(".", 2)[2]
        if name == "protocols.seed_plan":
            from ayt.studies.protocols.seed_plan import main
            return main(args)
        from ayt.studies.engine.cli import study_main
        return study_main(name, [*args, "--cfg"])
    if module == "ayt.bench":
        from ayt.bench.__main__ import parse_args
        parse_args(args)
        return 0
    if module == "ayt.cluster":
        from ayt.cluster.__main__ import _parser
        _parser().parse_args(args)
        return 0
    with pytest.raises(SystemExit) as done:            # a tool: its --help parses
        __import__(module, fromlist=["main"]).main(["--help"])
    return int(done.value.code or 0)


@pytest.mark.parametrize("where, command", COMMANDS, ids=[f"{w}:{c[:60]}" for w, c in COMMANDS])
def test_every_documented_command_resolves(where, command, tmp_path, monkeypatch):
    if PLACEHOLDER.search(command):
        pytest.skip("names a cluster's files or addresses")
    # From a fresh directory (the relative out_dir default, as a new user has it), unless the
    # command reads the committed studies/ (a seed plan's pilot).
    monkeypatch.chdir(ROOT if "studies/" in command else tmp_path)
    argv = [a for a in shlex.split(command.rstrip('"')) if a != "--report"]    # --report: its plan
    assert _dry_run(argv) == 0, f"{where}: `{command}` no longer resolves"
