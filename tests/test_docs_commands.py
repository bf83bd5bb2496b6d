"""The docs stay true to the code.

Every `fleetctl`, `fleet-node` and `fleet-coordinator` command shown in a fenced code block
of README.md, docs/*.md or bench/README.md is parsed (not run) by the program's real click
command, subcommands resolved, so a stale flag, a bad choice or a renamed subcommand fails
here; so does a `STUDIOFLEET_NODE_*` / `STUDIOFLEET_COORDINATOR_*` variable or a config-file
key that no setting reads. README.md stays under 10 KB, and every relative link in
README.md, docs/*.md and bench/README.md names a file (and heading) that exists.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest
import typer

try:  # typer >= 0.22 parses with its own copy of click
    from typer import _click as cli
    from typer._click import exceptions as cli_errors
    from typer.exceptions import Exit
except ImportError:  # older typer: click itself
    import click as cli
    from click import exceptions as cli_errors
    from click.exceptions import Exit

ROOT = Path(__file__).resolve().parent.parent
README_LIMIT_BYTES = 10 * 1024
SHELL_FENCES = {"", "sh", "bash", "shell", "console", "zsh", "shell-session"}
PLACEHOLDER = "PLACEHOLDER"
# What runs a command without being it: `sudo fleetctl ...`, `env A=1 fleet-node ...`.
WRAPPERS = {"sudo", "env", "exec", "time", "nohup"}
REDIRECTS = {"<", ">", ">>", "<<", "<<<", ">&", "<&", "&>", "&>>", ">|"}
SEPARATORS = {"|", "||", "&&", ";", "&", "(", ")", ";;", "|&"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([^\s`]*)")


def doc_files() -> list[Path]:
    files = [
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
        ROOT / "bench" / "README.md",
    ]
    return [f for f in files if f.exists()]


def programs() -> dict[str, str]:
    """The console scripts this checks, from pyproject.toml: name -> module."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    wanted = ("fleetctl", "fleet-node", "fleet-coordinator")
    return {name: scripts[name].split(":")[0] for name in wanted}


def click_command(module_name: str) -> cli.Command:
    """The program's click command: its module's typer app (or a click command it defines)."""
    module = importlib.import_module(module_name)
    for value in vars(module).values():
        if isinstance(value, typer.Typer):
            return typer.main.get_command(value)
    for value in vars(module).values():
        if isinstance(value, cli.Command):
            return value
    raise AssertionError(
        f"{module_name} defines no typer app or click command; teach this test its parser"
    )


# -- finding the commands ------------------------------------------------------------------


@dataclass
class DocCommand:
    where: str  # file:line
    program: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.where}: {self.program} {shlex.join(self.args)}"


def fenced_blocks(text: str):
    """(first line number, info string, lines) of each fenced code block."""
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        marker, info = m.group(1), m.group(2).lower()
        body, start = [], i + 2
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(marker):
            body.append(lines[i])
            i += 1
        i += 1
        yield start, info, body


def command_lines(start: int, body: list[str]):
    """(line number, command text) in a shell block: `$ ` prompts, `\\` continuations joined."""
    prompted = any(ln.lstrip().startswith("$ ") for ln in body)
    i = 0
    while i < len(body):
        number, line = start + i, body[i].strip()
        i += 1
        if prompted:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        while line.endswith("\\") and i < len(body):
            line = line[:-1] + " " + body[i].strip()
            i += 1
        yield number, line


def _placeholders(text: str) -> str:
    text = re.sub(r"\$\([^()]*\)", PLACEHOLDER, text)  # $(command)
    text = re.sub(r"\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*", PLACEHOLDER, text)  # $VAR, ${VAR}
    return re.sub(r"<[^<>\s][^<>]*>", PLACEHOLDER, text)  # <id>, <node id>


def _tokens(text: str) -> list[str]:
    lexer = shlex.shlex(_placeholders(text), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError:  # an unbalanced quote: prose, not a command
        return []


def _segments(tokens: list[str]):
    """Simple commands: split at | && ; ( ), with redirections and their targets left out."""
    segment: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in SEPARATORS:
            yield segment
            segment = []
        elif tok in REDIRECTS:
            i += 1  # and its target
        elif tok.isdigit() and i + 1 < len(tokens) and tokens[i + 1] in REDIRECTS:
            pass  # the 2 of 2>&1
        else:
            segment.append(tok)
        i += 1
    yield segment


def _clean(args: list[str]) -> list[str]:
    """Doc conventions: `...` for more arguments, `[--flag]` or `[-o json]` for optional ones."""
    out = []
    for a in args:
        if a.startswith("["):
            a = a[1:]
        if a.endswith("]"):
            a = a[:-1]
        if a and a not in ("...", "…"):
            out.append(a)
    return out


def commands_in(text: str, where: str, names) -> list[DocCommand]:
    found = []
    for start, info, body in fenced_blocks(text):
        if info not in SHELL_FENCES:
            continue
        block_env: dict[str, str] = {}
        for number, line in command_lines(start, body):
            for seg in _segments(_tokens(line)):
                env = dict(block_env)
                if seg and seg[0] == "export":
                    for a in seg[1:]:
                        if ASSIGNMENT.match(a):
                            k, _, v = a.partition("=")
                            block_env[k] = v
                    continue
                while seg and (ASSIGNMENT.match(seg[0]) or seg[0] in WRAPPERS):
                    if ASSIGNMENT.match(seg[0]):
                        k, _, v = seg[0].partition("=")
                        env[k] = v
                    seg = seg[1:]
                if seg and Path(seg[0]).name in names:
                    found.append(
                        DocCommand(f"{where}:{number}", Path(seg[0]).name, _clean(seg[1:]), env)
                    )
    return found


def documented_commands() -> list[DocCommand]:
    names = set(programs())
    return [
        c for f in doc_files() for c in commands_in(f.read_text(), str(f.relative_to(ROOT)), names)
    ]


# -- parsing them --------------------------------------------------------------------------

_COMMANDS: dict[str, cli.Command] = {}


def command_for(program: str) -> cli.Command:
    if program not in _COMMANDS:
        _COMMANDS[program] = click_command(programs()[program])
    return _COMMANDS[program]


@contextmanager
def _environment(env: dict[str, str]):
    """Only the command's own environment: none of the STUDIOFLEET_* of whoever runs the tests."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STUDIOFLEET_")}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        yield


def _is_placeholder(value: str) -> bool:
    """`<id>`, `$N` (both made PLACEHOLDER) or an upper-case name (`N`, `CA_DIR`) in the docs."""
    return PLACEHOLDER in value or re.fullmatch(r"[A-Z][A-Z0-9_]*", value) is not None


def _placeholder_given(param, args: list[str]) -> bool:
    """Whether the value the docs give `param` is a placeholder, which has no type to check."""
    opts = set(getattr(param, "opts", None) or []) | set(
        getattr(param, "secondary_opts", None) or []
    )
    if opts and all(o.startswith("-") for o in opts):
        values = [args[i + 1] for i, a in enumerate(args[:-1]) if a in opts]
        values += [a.partition("=")[2] for a in args if a.partition("=")[0] in opts and "=" in a]
    else:  # a positional argument: any positional word
        values = [a for a in args if not a.startswith("-")]
    return any(_is_placeholder(v) for v in values)


def parse(program: str, args: list[str], env: dict[str, str] | None = None) -> None:
    """Parse `program args` as the real CLI would, without running it; raise its UsageError."""
    command = command_for(program)
    with _environment(env or {}):
        try:
            ctx = command.make_context(program, list(args), resilient_parsing=False)
            while hasattr(ctx.command, "resolve_command"):  # a group: on to the subcommand
                rest = [*ctx._protected_args, *ctx.args]
                if not rest:
                    raise cli_errors.UsageError(f"{program}: names no subcommand", ctx)
                name, sub, sub_args = ctx.command.resolve_command(ctx, rest)
                ctx = sub.make_context(name, sub_args, parent=ctx, resilient_parsing=False)
        except Exit as done:  # --help
            if done.exit_code != 0:
                raise cli_errors.UsageError(f"exit {done.exit_code}") from done
        except cli_errors.MissingParameter as missing:
            if not (missing.param is not None and getattr(missing.param, "envvar", None)):
                raise  # an option the environment could give is context, not a stale doc
        except cli_errors.FileError:
            pass  # a file the docs name as an example need not exist here
        except cli_errors.BadParameter as bad:
            if not (
                _placeholder_given(bad.param, args) or "does not exist" in bad.format_message()
            ):
                raise


COMMANDS = documented_commands()


@pytest.mark.parametrize("doc", COMMANDS, ids=[f"{c.where} {c.program}" for c in COMMANDS])
def test_every_documented_command_parses(doc: DocCommand):
    try:
        parse(doc.program, doc.args, doc.env)
    except cli_errors.ClickException as exc:
        pytest.fail(
            f"{doc}\n  is refused by the real parser: {exc.format_message()}\n"
            "  fix the docs (or the CLI) so they agree"
        )


def test_the_docs_show_commands_of_every_program():
    seen = {c.program for c in COMMANDS}
    assert seen == set(programs()), f"no documented command found for {set(programs()) - seen}"
    assert len(COMMANDS) >= 50, len(COMMANDS)


@pytest.mark.parametrize(
    "program, args, why",
    [
        ("fleetctl", ["nodes", "--no-such-flag"], "No such option"),
        ("fleetctl", ["drain", "mac-03", "--timout", "120"], "No such option"),
        ("fleetctl", ["rollout", "strat", "--restart"], "No such command"),
        ("fleetctl", ["certs", "issue", "--role", "janitor", "--name", "x"], "janitor"),
        ("fleetctl", ["rollout"], "Usage: fleetctl rollout"),
        ("fleet-node", ["--model", "./m", "--max-runing", "4"], "No such option"),
        ("fleet-node", ["--model", "./m", "--max-running", "many"], "--max-running"),
        ("fleet-coordinator", ["--listen", "0.0.0.0:7800", "--no-such-flag"], "No such option"),
    ],
)
def test_a_stale_command_is_refused(program, args, why):
    with pytest.raises(cli_errors.ClickException) as refused:
        parse(program, args)
    assert why in refused.value.format_message()


def test_documented_commands_are_found_through_doc_conventions():
    text = "\n".join(
        [
            "Some prose with fleetctl nodes --bogus outside a fence.",
            "```sh",
            "$ export STUDIOFLEET_CA_DIR=./ca",
            "$ .venv/bin/fleetctl rollout pause <id> \\",
            "    --reason x   # a comment",
            "output line fleetctl --not-a-command",
            "$ STUDIOFLEET_TLS_NAME=me sudo fleet-node --model ./m --max-running $N 2>&1 | tee log",
            "$ fleetctl tokens revoke $TOKEN && fleet-coordinator --help",
            "$ fleetctl tokens list [--all] [-o json] ...",
            "```",
            "```toml",
            "fleetctl = 'not a command'",
            "```",
        ]
    )
    found = commands_in(text, "x.md", {"fleetctl", "fleet-node", "fleet-coordinator"})
    assert [(c.program, c.args) for c in found] == [
        ("fleetctl", ["rollout", "pause", PLACEHOLDER, "--reason", "x"]),
        ("fleet-node", ["--model", "./m", "--max-running", PLACEHOLDER]),
        ("fleetctl", ["tokens", "revoke", PLACEHOLDER]),
        ("fleet-coordinator", ["--help"]),
        ("fleetctl", ["tokens", "list", "--all", "-o", "json"]),
    ]
    assert found[0].env == {"STUDIOFLEET_CA_DIR": "./ca"}
    assert found[1].env == {"STUDIOFLEET_CA_DIR": "./ca", "STUDIOFLEET_TLS_NAME": "me"}
    assert found[0].where == "x.md:4"


# -- size and links ------------------------------------------------------------------------


def test_readme_stays_under_10_kb():
    size = (ROOT / "README.md").stat().st_size
    assert size < README_LIMIT_BYTES, f"README.md is {size} bytes; move detail into docs/"


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _prose(text: str) -> str:
    """The text outside fenced blocks and inline code spans."""
    out, fence = [], None
    for line in text.split("\n"):
        m = FENCE.match(line)
        if m and (fence is None or line.strip().startswith(fence)):
            fence = None if fence else m.group(1)
            out.append("")
            continue
        out.append("" if fence else re.sub(r"`+[^`]*`+", "", line))
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*|_{2}", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(path.read_text()).split("\n"):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(path: Path):
    prose = _prose(path.read_text())
    for number, line in enumerate(prose.split("\n"), 1):
        targets = [m.group(1) for m in LINK.finditer(line)]
        if (ref := REFERENCE.match(line)) is not None:
            targets.append(ref.group(1))
        for target in targets:
            if not SCHEME.match(target) and not target.startswith("//"):
                yield number, target


LINKED = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]


@pytest.mark.parametrize("doc", LINKED, ids=[str(p.relative_to(ROOT)) for p in LINKED])
def test_every_relative_link_resolves(doc: Path):
    broken = []
    for number, target in relative_links(doc):
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{doc.relative_to(ROOT)}:{number}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor.lower() not in anchors(dest):
            broken.append(
                f"{doc.relative_to(ROOT)}:{number}: {target} (no heading #{anchor} in {dest.name})"
            )
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_link_checker_sees_links():
    assert slug("Health, in layers") == "health-in-layers"
    assert slug("`fleetctl top`") == "fleetctl-top"
    links = dict((t, n) for n, t in relative_links(ROOT / "README.md"))
    assert "docs/architecture.svg" in links and "docs/README.md" in links


# -- settings the docs name ------------------------------------------------------------------


def _settings_models() -> dict[str, type]:
    from cluster.config import CoordinatorSettings, FleetctlSettings, NodeSettings

    return {"node": NodeSettings, "coordinator": CoordinatorSettings, "fleetctl": FleetctlSettings}


def test_every_documented_environment_variable_is_a_setting():
    models = _settings_models()
    stale = []
    for f in doc_files():
        for m in re.finditer(r"STUDIOFLEET_(NODE|COORDINATOR)_([A-Z0-9_]+)", f.read_text()):
            if m.group(2).lower() not in models[m.group(1).lower()].model_fields:
                stale.append(f"{f.relative_to(ROOT)}: {m.group(0)}")
    assert not stale, "environment variables no setting reads:\n" + "\n".join(stale)


def test_every_documented_config_file_key_is_a_setting():
    models = _settings_models()
    stale, tables = [], 0
    for f in doc_files():
        for start, info, body in fenced_blocks(f.read_text()):
            if info != "toml":
                continue
            for table, keys in tomllib.loads("\n".join(body)).items():
                if table in models:
                    tables += 1
                    fields = models[table].model_fields
                    stale += [
                        f"{f.relative_to(ROOT)}:{start} [{table}] {k}"
                        for k in keys
                        if k not in fields
                    ]
    assert tables >= 3, tables
    assert not stale, "config keys no setting reads:\n" + "\n".join(stale)
