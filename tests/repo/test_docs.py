"""The documentation is true: every `po-cluster` command line in README.md and docs/*.md names a
real command and real flags and parses, a few run for real, every relative link resolves, the
Makefile targets the docs name exist, and no file points outside the repository.

Commands are checked in this process through `po_cluster.cli.build_parser()` (one interpreter,
no Ray, nothing trained), so the whole file takes seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from po_cluster.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED = [*DOCS, ROOT / "serve" / "README.md"]  # every page whose links must resolve
PROGRAMS = ("po-cluster", ".venv/bin/po-cluster")
SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "<", "&"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


# ---------------------------------------------------------------- reading the docs


def code_blocks(text: str, where: str = "text") -> list[list[str]]:
    """The lines of each fenced code block (``` or ~~~), fences excluded."""
    blocks, current, fence = [], None, None
    for line in text.splitlines():
        marker = line.lstrip()[:3]
        if current is None and marker in ("```", "~~~"):
            current, fence = [], marker
        elif current is not None and marker == fence:
            blocks.append(current)
            current = None
        elif current is not None:
            current.append(line)
    assert current is None, f"{where}: a code block is never closed"
    return blocks


def shell_lines(block: list[str]) -> list[str]:
    """Logical lines: a line ending in `\\` continues on the next (comment lines never do)."""
    lines, pending = [], ""
    for line in block:
        if not pending and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    if pending:
        lines.append(pending)
    return lines


def command_words(line: str) -> list[str]:
    """The words of a shell line: quotes resolved, trailing comment, env prefix and pipes dropped."""
    words = shlex.split(line, comments=True)
    while words and ENV_ASSIGNMENT.match(words[0]):
        words = words[1:]
    for i, word in enumerate(words):
        if word in SHELL_OPERATORS:
            return words[:i]
    return words


def documented_lines() -> list[tuple[str, list[str]]]:
    """(where, words) of every shell line in a fenced block of README.md and docs/*.md."""
    found = []
    for page in DOCS:
        for block in code_blocks(page.read_text(), str(page.relative_to(ROOT))):
            for line in shell_lines(block):
                try:
                    words = command_words(line)
                except ValueError:
                    continue  # not shell (JSON, YAML, a diagram)
                if words:
                    found.append((f"{page.relative_to(ROOT)}: {line.strip()}", words))
    return found


def cli_commands() -> list[tuple[str, list[str]]]:
    """(where, arguments after the program) of every documented `po-cluster …` line."""
    return [(where, words[1:]) for where, words in documented_lines() if words[0] in PROGRAMS]


def script_commands() -> list[tuple[str, str, list[str]]]:
    """(where, script, arguments) of every documented `python jobs/….py …` line."""
    found = []
    for where, words in documented_lines():
        for i, word in enumerate(words):
            if word.startswith("jobs/") and word.endswith(".py") and i and words[i - 1].endswith("python"):
                found.append((where, word, words[i + 1:]))
    return found


def flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--") and len(a) > 2]


def mentions_flag(help_text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text) is not None


# ---------------------------------------------------------------- running the parser in process


def help_of(argv: list[str]) -> tuple[int, str]:
    """`po-cluster <argv> --help`: exit code and what it printed (argparse exits through SystemExit)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            build_parser().parse_args([*argv, "--help"])
        except SystemExit as done:
            return int(done.code or 0), out.getvalue() + err.getvalue()
    return 0, out.getvalue()  # pragma: no cover - --help always exits


def subcommand_path(args: list[str]) -> list[str]:
    """The leading words that name (sub)commands; a word where a subcommand must be is checked."""
    parser, path = build_parser(), []
    while True:
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subparsers:
            return path
        choices = subparsers[0].choices
        assert args[len(path):], f"`po-cluster {' '.join(path)}` needs one of {sorted(choices)}"
        word = args[len(path)]
        assert word in choices, f"`po-cluster {' '.join(path)}`: no subcommand {word!r} (have {sorted(choices)})"
        parser = choices[word]
        path.append(word)


def test_the_docs_show_commands():
    commands = cli_commands()
    assert len(commands) >= 30, commands  # the extraction works: README and the runbooks are full of them
    used = {tuple(subcommand_path(args)) for _, args in commands}
    for expected in [("train",), ("evaluate",), ("compare",), ("sweep",), ("pipeline",), ("serve",),
                     ("embed",), ("releases", "list"), ("releases", "push"), ("data", "typographic")]:
        assert expected in used, f"no documented `po-cluster {' '.join(expected)}`"


@pytest.mark.parametrize("where,args", cli_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_documented_command_exists_and_parses(where, args):
    path = subcommand_path(args)
    code, text = help_of(path)
    assert code == 0, f"{where}\n`po-cluster {' '.join(path)} --help` exited {code}:\n{text}"
    for flag in flags(args):
        assert mentions_flag(text, flag), f"{where}\n`po-cluster {' '.join(path)}` has no {flag}:\n{text}"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            build_parser().parse_args(args)
        except SystemExit as refused:
            pytest.fail(f"{where}\nthe documented line does not parse (exit {refused.code}):\n{err.getvalue()}")


def test_documented_job_scripts_take_their_flags(monkeypatch):
    scripts = script_commands()
    assert any(script == "jobs/embed.py" for _, script, _ in scripts), scripts
    for where, script, args in scripts:
        assert (ROOT / script).is_file(), f"{where}: no {script}"
        monkeypatch.setattr(sys, "argv", [script, "--help"])
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
            runpy.run_path(str(ROOT / script), run_name="__main__")
        assert done.value.code in (0, None), f"{where}: `{script} --help` exited {done.value.code}"
        for flag in flags(args):
            assert mentions_flag(out.getvalue(), flag), f"{where}: {script} has no {flag}:\n{out.getvalue()}"


def test_flag_check_catches_what_does_not_exist():
    code, text = help_of(["releases", "list"])
    assert code == 0 and mentions_flag(text, "--store") and not mentions_flag(text, "--stor")
    with pytest.raises(AssertionError, match="no subcommand 'relases'"):
        subcommand_path(["relases", "list"])
    with pytest.raises(AssertionError, match="needs one of"):
        subcommand_path(["data"])
    assert command_words("RAY_AUTH_MODE=token po-cluster sweep --config c.yaml  # why | not this") == \
        ["po-cluster", "sweep", "--config", "c.yaml"]
    assert shell_lines(["po-cluster data check \\", "    --image-size 64   # note", "# alone"]) == \
        ["po-cluster data check      --image-size 64   # note"]


# ---------------------------------------------------------------- a few commands for real


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`po-cluster <argv>` in this process; main() quiets the root logger, which is put back."""
    level = logging.getLogger().level
    try:
        code = main(list(argv))
    finally:
        logging.getLogger().setLevel(level)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def config_sections() -> list[str]:
    """The first column of README's table of run-config sections."""
    text = (ROOT / "README.md").read_text()
    table = text.split("| section | what |", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^\| `(\w+)` \|", table, flags=re.M)


def test_schema_prints_the_sections_the_readme_lists(capsys):
    code, out, _ = run_cli(capsys, "schema")
    assert code == 0
    properties = json.loads(out)["properties"]
    sections = config_sections()
    assert sections == ["model", "data", "loss", "optimizer", "training", "tracking"]
    assert set(sections) <= set(properties), sorted(properties)


def test_releases_push_list_show_pull_round_trip(capsys, tmp_path, monkeypatch):
    from po_cluster.model.checkpoint import write_manifest

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the pull cache: ~/.cache/po-cluster
    store, folder = str(tmp_path / "store"), tmp_path / "ckpt"
    assert run_cli(capsys, "releases", "list", "--store", store) == (0, f"no releases in {store}\n", "")
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({"test": {"attacked": 0.9}}))
    (folder / "model.json").write_text(json.dumps({"name": "po-tiny-rn"}))
    write_manifest(folder)
    code, out, _ = run_cli(capsys, "releases", "push", str(folder), "--id", "r-docs", "--store", store)
    assert (code, out) == (0, f"published r-docs to {store}\n")
    code, out, _ = run_cli(capsys, "releases", "list", "--store", store)
    assert code == 0 and re.search(r"^r-docs\s.*\(latest\)$", out, flags=re.M), out
    code, out, _ = run_cli(capsys, "releases", "show", "latest", "--store", store)
    shown = json.loads(out)
    assert code == 0 and shown["release_id"] == "r-docs" and shown["metrics"] == {"test": {"attacked": 0.9}}
    code, out, _ = run_cli(capsys, "releases", "pull", "latest", "--to", str(tmp_path / "release"), "--store", store)
    assert (code, out) == (0, f"{tmp_path / 'release'}\n")
    assert {p.name: p.read_bytes() for p in (tmp_path / "release").iterdir()} == \
        {p.name: p.read_bytes() for p in folder.iterdir()}
    code, _, err = run_cli(capsys, "releases", "show", "r-missing", "--store", store)
    assert code == 1 and "r-missing" in err


def test_data_typographic_then_check(capsys, tmp_path):
    from PIL import Image

    for name, colour in (("red_thing", "red"), ("blue_thing", "blue"), ("green_thing", "green")):
        (tmp_path / "images" / name).mkdir(parents=True)
        Image.new("RGB", (40, 30), colour).save(tmp_path / "images" / name / "0.png")
    source, out_dir = str(tmp_path / "images"), str(tmp_path / "typo-ds")
    code, out, _ = run_cli(capsys, "data", "typographic", source, "--out", out_dir, "--variants", "2",
                           "--seed", "0", "--image-size", "64")
    assert (code, out) == (0, f"wrote 6 preference pairs from 3 images of 3 classes to {out_dir}\n")
    code, out, _ = run_cli(capsys, "data", "check", out_dir)
    assert code == 0
    assert out.splitlines() == [f"{out_dir}: 6 pairs (6 train, 0 val, 0 test), 3 regularisation images, images 64x64",
                                "warning: no pairs in val or test: a sweep needs val to choose on and test to score "
                                "on (classes of fewer than 3 source images keep them all for train)",
                                "candidates (3):",
                                "  a photo of a blue thing.", "  a photo of a green thing.",
                                "  a photo of a red thing."]
    code, _, err = run_cli(capsys, "data", "typographic", source, "--out", str(tmp_path / "x"), "--variants", "3")
    assert code == 2 and "fewer than variants=3" in err  # a word is always another class's name


# ---------------------------------------------------------------- links, make targets, references


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The page without its fenced code blocks and inline code: where links are links."""
    text = re.sub(r"^( *)(```|~~~).*?^\1\2[^\n]*$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", prose(page.read_text()), flags=re.M)}


def relative_links(page: Path) -> list[str]:
    targets = [a or b for a, b in LINK.findall(prose(page.read_text()))]
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_every_relative_link_resolves():
    checked = 0
    for page in LINKED:
        for target in relative_links(page):
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.relative_to(ROOT)}: link to {target}, which does not exist"
            if anchor and file.suffix == ".md":
                assert anchor in anchors(file), f"{page.relative_to(ROOT)}: no heading #{anchor} in {path or page.name}"
            checked += 1
    assert checked >= 40, checked


def test_link_check_sees_links_and_headings():
    assert slug("2. Create the Secrets") == "2-create-the-secrets"
    assert slug("What is in `k8s/`") == "what-is-in-k8s"
    assert "configs-and-checkpoints" in anchors(ROOT / "README.md")
    page = "[a](docs/x.md) `[b](not-a-link)` ![c](y.png) [d](https://e.org) [f](#top)\n```\n[g](z)\n```\n"
    assert [a or b for a, b in LINK.findall(prose(page))] == ["docs/x.md", "y.png", "https://e.org", "#top"]


def makefile_names() -> tuple[set[str], set[str]]:
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z][\w-]*):(?!=)", text, flags=re.M))
    variables = set(re.findall(r"^([A-Z][A-Z0-9_]*)\s*[?:]?=", text, flags=re.M))
    return targets, variables


def test_documented_make_commands_exist():
    targets, variables = makefile_names()
    made = [words for _, words in documented_lines() if words[0] == "make"]
    assert ["make", "test", "BROWSER=0"] in made and ["make", "demo"] in made
    for words in made:
        for word in words[1:]:
            name, is_variable, _ = word.partition("=")
            assert (name in variables) if is_variable else (name in targets), f"Makefile has no {word!r}"


def test_browser_zero_deselects_the_browser_test():
    text = (ROOT / "Makefile").read_text()
    node = re.search(r"^BROWSER_TEST := (\S+)::(\w+)$", text, flags=re.M)
    assert node, "Makefile: no BROWSER_TEST"
    test_file = (ROOT / node.group(1)).read_text()
    assert re.search(rf"^def {node.group(2)}\(", test_file, flags=re.M), f"{node.group(2)} is not a test any more"
    assert "_browser_or_skip()" in test_file.split(f"def {node.group(2)}(", 1)[1].split("\ndef ", 1)[0]
    assert "--deselect $(BROWSER_TEST)" in text.split("ifeq ($(BROWSER),0)", 1)[1].split("else", 1)[0]


# Built from pieces, so that this file does not mention what it looks for.
OUTSIDE = [re.escape("../" + "shared"), re.escape("DESIGN" + " §")]
ISSUE_NUMBER = re.compile(
    r"(?i)\b(?:issues?|bugs?|tickets?|pr|pull request|fix(?:es|ed)?|close[sd]?|resolve[sd]?)\s*#\s*\d+"
    r"|\bissue\s+(?:no\.?\s*)?\d+\b|\bgh-\d+\b"
    r"|(?<![\w&#/:])(?<!: )#\d+\b")  # a bare number sign; CSS colours follow `: `
FORBIDDEN = re.compile("|".join(OUTSIDE) + "|" + ISSUE_NUMBER.pattern.removeprefix("(?i)"), re.I)


def repository_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode()
    return [ROOT / name for name in listed.split("\0") if name and (ROOT / name).is_file()]


def test_no_file_points_outside_the_repository_or_at_issues():
    offences = []
    for path in repository_files():
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary: weights, images
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if FORBIDDEN.search(line):
                offences.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not offences, "\n".join(offences)


def test_the_reference_check_catches_them():
    for line in ["see " + "../" + "shared/spec.md", "as in " + "DESIGN" + " §4", "fixes #" + "12", "(#" + "7)",
                 "Issue " + "31 again", "GH-" + "9"]:
        assert FORBIDDEN.search(line), line
    for line in ["color: #222;", "fill_colors: [red, '#00ff00']", "## 1. Install", "x = y  # 3 steps"]:
        assert not FORBIDDEN.search(line), line
