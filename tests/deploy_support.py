"""Machinery shared by tests/test_deploy*.py (no tests here): deploy file kinds, YAML helpers, command
extraction from every file and its parsing by the real launchers' and modules' parsers, Dockerfiles."""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import io
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"

# What validates each kind of file (patterns relative to deploy/, first match wins).
KINDS = [
    ("README.md", "readme"),
    ("ray/cluster.yaml", "ray-cluster"),
    ("k8s/rayjob-tokenise.yaml", "rayjob"),
    ("k8s/pytorchjob-pretrain.yaml", "pytorchjob"),
    ("k8s/s3-credentials.example.yaml", "secret-template"),
    ("k8s/minio.yaml", "minio-k8s"),
    ("minio/docker-compose.yaml", "compose"),
    ("minio/*.env.example", "env-template"),
    ("deepspeed/hostfile*", "hostfile"),
    ("deepspeed/*.sh", "shell"),
    ("docker/Dockerfile.*.dockerignore", "dockerignore"),
    ("docker/Dockerfile.*", "dockerfile"),
]
# Modules whose commands are parsed; any other `-m pipeline.*` / `-m pretrain.*` in deploy/ is an error.
VALIDATED_MODULES = ("pipeline.tokenise", "pretrain.train", "pretrain.finetune", "pretrain.evaluate")
LAUNCHERS = {"python", "python3", "deepspeed", "torchrun", "ray", "vqpt"}
CREDENTIAL_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MINIO_ROOT_USER",
                    "MINIO_ROOT_PASSWORD", "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY", "RAY_AUTH_TOKEN")


def rel(path: Path) -> str:
    return path.relative_to(DEPLOY).as_posix()


def deploy_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def kind_of(path: Path) -> str | None:
    name = rel(path)
    return next((kind for pattern, kind in KINDS if fnmatch.fnmatchcase(name, pattern)), None)


def files_of(kind: str) -> list[Path]:
    found = [p for p in deploy_files() if kind_of(p) == kind]
    assert found, f"deploy/ has no file of kind {kind!r}"
    return found


def load_yaml(path: Path) -> list:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as err:
        pytest.fail(f"deploy/{rel(path)}: not valid YAML: {err}")
    assert docs, f"deploy/{rel(path)}: no YAML document"
    return docs


def get(doc, dotted: str, where: str):
    """doc["a"]["b"]... for "a.b", failing with the file and field named when a key is missing."""
    node = doc
    for key in dotted.split("."):
        assert isinstance(node, dict) and key in node, f"{where}: missing field {dotted} (no {key!r})"
        node = node[key]
    return node


def walk(node):
    """Every dict and list inside a YAML tree."""
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def strings(node, path: str = ""):
    """(field path, value) of every string scalar in a YAML tree."""
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from strings(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from strings(v, f"{path}[{i}]")


def constraint_pin(package: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package.lower():
            return version.strip()
    raise AssertionError(f"constraints.txt pins no {package}")


# -- command extraction ---------------------------------------------------------------------------

@dataclass
class Text:
    """A piece of shell-like text: a YAML string, a comment block, a Markdown code block."""

    where: str
    text: str
    code: bool  # code (every module invocation must be extracted) or comments (prose allowed)
    env: dict = field(default_factory=dict)
    first_line: int = 0  # the text's first line in its file, when it is a run of lines of the file

    def at(self, lineno: int) -> str:
        return f"{self.where}:{self.first_line + lineno - 1}" if self.first_line else f"{self.where} line {lineno}"


@dataclass
class Invocation:
    where: str
    module: str
    args: list[str]
    launcher: str
    launcher_args: object = None  # the launcher's parsed arguments (argparse Namespace or click params)


PROJECT_MODULE = re.compile(r"(?:^|\s)(?:-m|--module)[\s=]+[\"']?((?:pipeline|pretrain)(?:\.\w+)+)")
VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")
OPERATOR = re.compile(r"^[();<>|&]+$")


def expand(text: str, env: dict) -> str:
    """Shell parameter expansion, as far as a static check can go: known names and ${X:-default};
    "$@" and "${ARRAY[@]}" expand to nothing; anything else is left as written (then flagged)."""
    text = re.sub(r"\"\$\{\w+\[@\]\}\"|\$\{\w+\[@\]\}|\"\$@\"|\$@", "", text)

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(4)
        if name in env:
            return str(env[name])
        if m.group(2) in ("-", ":-"):
            return m.group(3)
        return m.group(0)

    return VAR.sub(sub, text)


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, line) with backslash-newline continuations joined."""
    out, buf, start = [], "", None
    for i, line in enumerate(text.splitlines(), 1):
        if start is None:
            start = i
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append((start, buf + line))
        buf, start = "", None
    if buf:
        out.append((start, buf))
    return out


def words(line: str) -> list[str]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    try:
        return list(lex)
    except ValueError as err:
        raise AssertionError(f"cannot split {line!r} like a shell: {err}") from None


def simple_commands(tokens: list[str]) -> list[list[str]]:
    out, cur = [], []
    for t in tokens:
        if OPERATOR.match(t):
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append(t)
    if cur:
        out.append(cur)
    return out


def program(argv: list[str]) -> list[str]:
    """argv without leading VAR=value assignments and exec/env/nohup/time wrappers."""
    i = 0
    while i < len(argv) and (re.match(r"^\w+=", argv[i]) or argv[i] in ("exec", "env", "nohup", "time", "sudo")):
        i += 1
    return argv[i:]


def looks_like_command(line: str) -> bool:
    """An example command in a comment: indented (two spaces or more after the '#'; prose has one),
    shell-like, and one of its simple commands runs a launcher."""
    if not line.startswith("  "):
        return False
    try:
        argvs = simple_commands(words(line))
    except AssertionError:
        return False
    return any(program(a) and PurePosixPath(program(a)[0]).name in LAUNCHERS for a in argvs)


def comment_texts(path: Path, lines: list[str]) -> list[Text]:
    """Blocks of consecutive whole-line comments, the '#' taken off."""
    out, block, start = [], [], 0
    for i, line in enumerate([*lines, ""], 1):
        s = line.strip()
        if s.startswith("#") and not s.startswith("#!"):
            if not block:
                start = i
            block.append(s[1:])
            continue
        if block:
            out.append(Text(f"deploy/{rel(path)}", "\n".join(block), code=False, first_line=start))
            block = []
    return out


def injected_env(doc: dict) -> dict:
    """Variables a Kubernetes operator sets in the containers (PyTorchJob: torchrun's PET_*)."""
    if not isinstance(doc, dict) or doc.get("kind") != "PyTorchJob":
        return {}
    specs = doc.get("spec", {}).get("pytorchReplicaSpecs", {})
    nodes = sum(int(s.get("replicas", 1)) for s in specs.values())
    return {"PET_NNODES": str(nodes), "PET_NPROC_PER_NODE": str(doc["spec"].get("nprocPerNode", "auto")),
            "PET_NODE_RANK": "0", "PET_MASTER_ADDR": f"{doc['metadata']['name']}-master-0",
            "PET_MASTER_PORT": "23456"}


def literal_env(doc) -> dict:
    """name -> value of every Kubernetes env entry with a literal value."""
    env = {}
    for node in walk(doc):
        if isinstance(node, dict) and isinstance(node.get("env"), list):
            for e in node["env"]:
                if isinstance(e, dict) and "value" in e:
                    env[e["name"]] = str(e["value"])
    return env


def texts_of(path: Path) -> list[Text]:
    raw = path.read_text()
    lines = raw.splitlines()
    kind = kind_of(path)
    out = comment_texts(path, lines) if kind != "readme" else []
    if kind == "readme":
        fence = None
        for i, line in enumerate(lines, 1):
            m = re.match(r"^```(\w*)\s*$", line.strip())
            if m and fence is None:
                fence, lang, body = i, m.group(1), []
            elif line.strip() == "```" and fence is not None:
                if lang in ("", "bash", "sh", "shell", "console"):
                    out.append(Text(f"deploy/{rel(path)}", "\n".join(body), code=True, first_line=fence + 1))
                fence = None
            elif fence is not None:
                body.append(line)
        assert fence is None, f"deploy/{rel(path)}: unclosed code block from line {fence}"
    elif path.suffix == ".yaml":
        for n, doc in enumerate(load_yaml(path)):
            env = {**literal_env(doc), **injected_env(doc)}
            for fpath, value in strings(doc):
                if not re.search(r"\s", value.strip()):
                    continue  # one word: a name or a value, not a command line
                out.append(Text(f"deploy/{rel(path)} (document {n + 1}, {fpath})", value, code=True, env=env))
    return out


def assignments(tokens: list[str], env: dict) -> None:
    """Record `export A=1 B=2` / `A=1` (alone on a line) into env."""
    if tokens and tokens[0] == "export":
        tokens = tokens[1:]
    if tokens and all(re.match(r"^\w+=", t) for t in tokens):
        for t in tokens:
            name, _, value = t.partition("=")
            env[name] = value


def invocations(text: Text) -> list[Invocation]:
    env = dict(text.env)
    found = []
    for lineno, line in logical_lines(text.text):
        line = expand(line, env)
        if not text.code and not looks_like_command(line):
            continue  # prose in a comment
        for argv in simple_commands(words(line)):
            assignments(argv, env)
            argv = program(argv)
            if argv and PurePosixPath(argv[0]).name in LAUNCHERS:
                found += launch(argv, text.at(lineno))
    if text.code:
        mentioned = PROJECT_MODULE.findall(text.text)
        assert len(mentioned) == len(found), (
            f"{text.where}: mentions module(s) {mentioned} but {len(found)} command(s) were understood "
            f"({[i.module for i in found]}); write each as a plain `python -m` / `deepspeed --module` / "
            f"`torchrun -m` command")
    return found


def launch(argv: list[str], where: str) -> list[Invocation]:
    """The project module invocations of one simple command, launcher flags parsed by the launcher."""
    name = PurePosixPath(argv[0]).name
    if name in ("python", "python3"):
        if "-m" not in argv:
            return []
        i = argv.index("-m")
        module = argv[i + 1] if i + 1 < len(argv) else ""
        if not re.match(r"^(pipeline|pretrain)\.", module):
            return []
        return [Invocation(where, module, argv[i + 2:], "python")]
    if name == "deepspeed":
        from deepspeed.launcher.runner import parse_args

        parsed = parse_launcher(parse_args, argv[1:], where, "deepspeed")
        assert parsed.module, f"{where}: deepspeed runs a script, not a module (--module {parsed.user_script})"
        return [Invocation(where, parsed.user_script, list(parsed.user_args), "deepspeed", parsed)]
    if name == "torchrun":
        from torch.distributed.run import get_args_parser

        parsed = parse_launcher(get_args_parser().parse_args, argv[1:], where, "torchrun")
        assert parsed.module, f"{where}: torchrun runs a script, not a module (-m {parsed.training_script})"
        return [Invocation(where, parsed.training_script, list(parsed.training_script_args), "torchrun", parsed)]
    if name == "vqpt":
        if argv[1:2] == ["tokenise"]:
            return [Invocation(where, "pipeline.tokenise", argv[2:], "vqpt")]
        from vqpt.cli import build_parser

        parse_launcher(build_parser().parse_args, argv[1:], where, "vqpt")
        return []
    if name == "ray":
        params = parse_ray(argv[1:], where)
        entry = list(params.get("entrypoint") or ())
        return launch(entry, where) if entry and PurePosixPath(entry[0]).name in LAUNCHERS else []
    return []


def parse_launcher(parse, args: list[str], where: str, what: str):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse(args)
    except SystemExit:
        raise AssertionError(f"{where}: {what} rejects its arguments {args}: {err.getvalue().strip()}") from None


def parse_ray(args: list[str], where: str) -> dict:
    """Parse `ray ...` with Ray's own click CLI (down to the subcommand), returning its parameters."""
    import click
    from ray.scripts.scripts import cli

    cmd, rest, path = cli, list(args), ["ray"]
    while isinstance(cmd, click.Group):
        assert rest, f"{where}: `{' '.join(path)}` needs a subcommand"
        sub = cmd.get_command(click.Context(cmd), rest[0])
        assert sub is not None, f"{where}: `{' '.join(path)}` has no subcommand {rest[0]!r}"
        path.append(rest.pop(0))
        cmd = sub
    try:
        return cmd.make_context(" ".join(path), rest).params
    except click.ClickException as err:
        raise AssertionError(f"{where}: `{' '.join(path)}` rejects {rest}: {err.format_message()}") from None


# -- module argument validation -------------------------------------------------------------------

class Reached(Exception):
    """Raised by the stand-ins for the functions that would start the work: parsing is done."""

    def __init__(self, value):
        super().__init__("reached")
        self.value = value


def parse_module(inv: Invocation, monkeypatch, capsys):
    """Parse ``inv.args`` with the module's real parser; returns what the module would run with:
    a JobConfig (tokenise), (TrainConfig, resume) (train, finetune), the Namespace (evaluate)."""
    where = f"{inv.where}: {inv.module}"
    unresolved = [a for a in inv.args if "$" in a]
    assert not unresolved, f"{where}: unresolved shell variable(s) in the arguments: {unresolved}"
    assert inv.module in VALIDATED_MODULES, (
        f"{where}: no parser check for module {inv.module}; add one to tests/deploy_support.py")
    capsys.readouterr()
    try:
        with monkeypatch.context() as mp:
            mp.chdir(ROOT)
            mp.delenv("RANK", raising=False)
            if inv.module == "pipeline.tokenise":
                from pipeline.tokenise import parse_args

                return parse_args(inv.args)
            if inv.module == "pretrain.evaluate":
                from pretrain import evaluate

                signature = inspect.signature(evaluate.evaluate)

                def stop(*args, **kwargs):  # the evaluation's arguments, by name
                    raise Reached(SimpleNamespace(**signature.bind(*args, **kwargs).arguments))

                mp.setattr(evaluate, "evaluate", stop)
                evaluate.main(inv.args)
                raise AssertionError(f"{where}: evaluate.main returned without evaluating")
            from pretrain import finetune, train

            def reached(cfg, resume=None):
                raise Reached((cfg, resume))

            mp.setattr(train, "train", reached)
            (train.main if inv.module == "pretrain.train" else finetune.main)(list(inv.args))
            raise AssertionError(f"{where}: the trainer returned without training")
    except Reached as r:
        value = r.value
    except SystemExit as e:
        raise AssertionError(f"{where}: the parser rejects {inv.args}: {capsys.readouterr().err.strip()} "
                             f"(exit {e.code})") from None
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise AssertionError(f"{where}: {type(err).__name__}: {err}") from None
    return value  # train / finetune: load_config typed and checked every section (model, objective, augment too)


def file_invocations(path: Path) -> list[Invocation]:
    return [inv for text in texts_of(path) for inv in invocations(text)]


# -- used by several test groups ------------------------------------------------------------------

def bucket_names() -> set[str]:
    names = set()
    for path in deploy_files():
        names |= set(re.findall(r"s3://([a-z0-9][a-z0-9.-]+)/", path.read_text()))
    return names


INSTRUCTIONS = {"FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "USER", "CMD", "ENTRYPOINT", "LABEL",
                "EXPOSE", "SHELL", "HEALTHCHECK", "VOLUME", "STOPSIGNAL", "ONBUILD"}


def dockerfile(path: Path) -> list[tuple[int, str, str]]:
    """(line, INSTRUCTION, arguments) with continuations joined and comments dropped."""
    out, buf, start = [], "", None
    for i, line in enumerate(path.read_text().splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        start = start or i
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        name, _, rest = (buf + s).partition(" ")
        assert name in INSTRUCTIONS, f"deploy/{rel(path)}:{start}: unknown instruction {name!r}"
        out.append((start, name, rest.strip()))
        buf, start = "", None
    assert not buf, f"deploy/{rel(path)}: ends inside a continued instruction"
    return out


def docker_workdir() -> str:
    workdirs = {rest for p in files_of("dockerfile") for _, name, rest in dockerfile(p) if name == "WORKDIR"}
    assert len(workdirs) == 1, f"deploy/docker: the images disagree on WORKDIR ({workdirs})"
    return workdirs.pop()
