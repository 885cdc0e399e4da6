"""deploy/: every file parses, has the structure its tool expects, holds no credentials, and every vqpt
command in it is accepted by the real command-line parsers (its config file and overrides loaded).

No network, docker or kubectl: YAML is checked structurally (Ray's own JSON schema for the cluster
launcher config), Dockerfiles are parsed into instructions, shell scripts go through ``bash -n`` (and
shellcheck when installed), and ``deploy/deepspeed/launch.sh`` runs in its ``DRY_RUN=1`` mode.

Commands are found in YAML string values and comments, Markdown code blocks and comments of every
file; a command is a simple shell command whose program is ``python``, ``deepspeed``, ``torchrun``,
``ray`` or ``vqpt``. Launcher flags go through the launchers' own parsers (DeepSpeed's runner,
torchrun's, Ray's click CLI); the module's arguments through ``pipeline.tokenise.parse_args``,
``pretrain.train.parse_args`` + ``run``, ``pretrain.finetune.main`` and ``pretrain.evaluate.main``,
stopped just before any work starts. A file added under deploy/ that no check here knows fails
``test_every_deploy_file_is_validated``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import io
import os
import re
import shlex
import shutil
import subprocess
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
REQUIRED = ["README.md", "ray/cluster.yaml", "k8s/rayjob-tokenise.yaml", "k8s/pytorchjob-pretrain.yaml",
            "k8s/s3-credentials.example.yaml", "k8s/minio.yaml", "minio/docker-compose.yaml",
            "deepspeed/hostfile.example", "deepspeed/launch.sh", "docker/Dockerfile.cpu", "docker/Dockerfile.cuda"]
# Modules whose commands are parsed; any other `-m pipeline.*` / `-m pretrain.*` in deploy/ is an error.
VALIDATED_MODULES = ("pipeline.tokenise", "pretrain.train", "pretrain.finetune", "pretrain.evaluate")
EXPECTED_MODULES = {
    "README.md": set(VALIDATED_MODULES),
    "ray/cluster.yaml": {"pipeline.tokenise"},
    "k8s/rayjob-tokenise.yaml": {"pipeline.tokenise"},
    "k8s/pytorchjob-pretrain.yaml": {"pretrain.train"},
}
LAUNCHERS = {"python", "python3", "deepspeed", "torchrun", "ray", "vqpt"}
CREDENTIAL_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MINIO_ROOT_USER",
                    "MINIO_ROOT_PASSWORD", "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY", "RAY_AUTH_TOKEN")
SECRET_NAME = "vqpt-s3"
SECRET_TEMPLATE = "k8s/s3-credentials.example.yaml"
# Paths the docs name that the user creates (a copy of a template), not files of the repository.
USER_CREATED = {"deploy/deepspeed/hostfile"}


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


def check_train_config(cfg, where: str) -> None:
    """The free-form sections load_config leaves alone: objective, model and augment fields."""
    from pretrain.augment import TokenAugConfig
    from pretrain.objectives import OBJECTIVES, _registry, make_config
    from pretrain.vit import vit_config

    objective = dict(cfg.objective)
    name = objective.pop("name", "mtm")
    assert name in OBJECTIVES, f"{where}: objective.name {name!r} is not one of {OBJECTIVES}"
    make_config(_registry()[name][0], objective, f"{where}: section 'objective'")
    model = dict(cfg.model)
    pixels = getattr(cfg.data, "input", "tokens") == "pixels"
    grid, vocab = (cfg.data.resolution, 1) if pixels else (32, 512)
    vit_config(model.pop("preset", "tiny"), grid=grid, vocab_size=vocab, **model)
    if cfg.augment is not None and not pixels:
        augment = dict(cfg.augment)
        if augment.get("cutmix_alpha", 0) > 0 or augment.get("mixup_alpha", 0) > 0:
            augment.setdefault("num_classes", 1000)
        make_config(TokenAugConfig, augment, f"{where}: section 'augment'")


def parse_module(inv: Invocation, monkeypatch, capsys):
    """Parse ``inv.args`` with the module's real parser; returns what the module would run with:
    a JobConfig (tokenise), (TrainConfig, resume) (train, finetune), the Namespace (evaluate)."""
    where = f"{inv.where}: {inv.module}"
    unresolved = [a for a in inv.args if "$" in a]
    assert not unresolved, f"{where}: unresolved shell variable(s) in the arguments: {unresolved}"
    assert inv.module in VALIDATED_MODULES, (
        f"{where}: no parser check for module {inv.module}; add one to tests/test_deploy.py")
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
    if inv.module in ("pretrain.train", "pretrain.finetune"):
        try:
            check_train_config(value[0], where)
        except (ValueError, TypeError) as err:
            raise AssertionError(f"{where}: {type(err).__name__}: {err}") from None
    return value


def file_invocations(path: Path) -> list[Invocation]:
    return [inv for text in texts_of(path) for inv in invocations(text)]


# -- coverage and generic checks ------------------------------------------------------------------

def test_every_deploy_file_is_validated():
    missing = [f"deploy/{name}" for name in REQUIRED if not (DEPLOY / name).is_file()]
    assert not missing, f"required deploy files are missing: {missing}"
    unknown = [f"deploy/{rel(p)}" for p in deploy_files() if kind_of(p) is None]
    assert not unknown, (f"no test validates {unknown}: add the file's pattern and checks to KINDS in "
                         f"tests/test_deploy.py (or remove the file)")


def test_yaml_files_load():
    for path in deploy_files():
        if path.suffix in (".yaml", ".yml"):
            load_yaml(path)


@pytest.mark.parametrize("name", [rel(p) for p in deploy_files()])
def test_commands_parse(name, monkeypatch, capsys):
    """Every command in the file parses with the real CLIs; configs and overrides load."""
    path = DEPLOY / name
    if kind_of(path) is None:
        pytest.skip("not a known deploy file (test_every_deploy_file_is_validated fails for it)")
    found = file_invocations(path)
    for inv in found:
        parsed = parse_module(inv, monkeypatch, capsys)
        if inv.module == "pipeline.tokenise":
            assert not re.match(r"^\w+://", parsed.src), (
                f"{inv.where}: pipeline.tokenise --src {parsed.src}: the readers take local paths only "
                f"(mount the raw dataset on every node)")
    expected = EXPECTED_MODULES.get(name, set())
    missing = expected - {inv.module for inv in found}
    assert not missing, f"deploy/{name}: expected command(s) for {sorted(missing)}, found none"


def test_referenced_repository_paths_exist():
    pattern = re.compile(r"(?<![\w./~-])((?:deploy|configs|pipeline|pretrain|storage|scripts|tests|vqpt)/[\w./-]*\w)")
    for path in deploy_files():
        for m in pattern.finditer(path.read_text()):
            ref = m.group(1)
            if ref in USER_CREATED or "*" in ref:
                continue
            assert (ROOT / ref).exists(), f"deploy/{rel(path)} names {ref}, which does not exist in the repository"


LITERAL_ASSIGNMENT = re.compile(rf"\b({'|'.join(CREDENTIAL_NAMES)}|MC_HOST_\w+)\b[\"']?[ \t]*[=:][ \t]*([^\s,)`]+)")


def is_placeholder(value: str) -> bool:
    return "$" in value or "REPLACE" in value or value.strip("\"'") in ("", "...")


def test_no_literal_credentials():
    for path in deploy_files():
        text = path.read_text()
        where = f"deploy/{rel(path)}"
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), f"{where}: holds what looks like an AWS key id"
        assert "PRIVATE KEY-----" not in text, f"{where}: holds a private key"
        for m in LITERAL_ASSIGNMENT.finditer(text):
            assert is_placeholder(m.group(2)), (
                f"{where}: {m.group(1)} is given a literal value ({m.group(0)!r}); credentials come from "
                f"Secrets or the environment only")
        if path.suffix == ".yaml":
            for doc in load_yaml(path):
                if isinstance(doc, dict) and doc.get("kind") == "Secret":
                    assert rel(path) == SECRET_TEMPLATE, f"{where}: defines a Secret; only {SECRET_TEMPLATE} may"
                for node in walk(doc):
                    if isinstance(node, dict) and isinstance(node.get("env"), list):
                        for e in node["env"]:
                            if e.get("name") in CREDENTIAL_NAMES:
                                assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), (
                                    f"{where}: env {e.get('name')} must come from valueFrom.secretKeyRef")


# -- Kubernetes -----------------------------------------------------------------------------------

def k8s_docs(name: str) -> list[dict]:
    docs = load_yaml(DEPLOY / name)
    for i, doc in enumerate(docs):
        where = f"deploy/{name} (document {i + 1})"
        assert isinstance(doc, dict), f"{where}: not a mapping"
        for key in ("apiVersion", "kind", "metadata.name"):
            get(doc, key, where)
    return docs


def pod_specs(doc) -> list[dict]:
    """Every pod spec (a dict with a containers list) inside a Kubernetes object."""
    return [n for n in walk(doc) if isinstance(n, dict) and isinstance(n.get("containers"), list)]


def check_container(c: dict, where: str) -> None:
    for key in ("name", "image", "resources.limits"):
        get(c, key, where)


def check_s3_env(c: dict, where: str) -> None:
    env = {e["name"]: e for e in c.get("env", [])}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "VQPT_S3_ENDPOINT"):
        assert name in env, f"{where}: container {c['name']} has no env {name}"
        ref = get(env[name], "valueFrom.secretKeyRef", f"{where}: env {name}")
        assert ref.get("name") == SECRET_NAME, f"{where}: env {name} reads Secret {ref.get('name')}, not {SECRET_NAME}"


def gpus(c: dict) -> int:
    return int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def mounted_from(path: str, c: dict, pod: dict, where: str) -> dict:
    """The pod volume behind the container mount that holds ``path``."""
    mounts = [m for m in c.get("volumeMounts", []) if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")]
    assert mounts, f"{where}: {path} is not under any volumeMount of container {c['name']}"
    volume = max(mounts, key=lambda m: len(m["mountPath"]))["name"]
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    assert volume in vols, f"{where}: volumeMount {volume} has no volume"
    return vols[volume]


def check_shm(c: dict, pod: dict, where: str) -> None:
    vol = mounted_from("/dev/shm", c, pod, where)
    assert vol.get("emptyDir", {}).get("medium") == "Memory", f"{where}: /dev/shm must be a memory emptyDir"


def test_rayjob_tokenise(monkeypatch, capsys):
    name = "k8s/rayjob-tokenise.yaml"
    (doc,) = k8s_docs(name)
    where = f"deploy/{name}"
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob", f"{where}: apiVersion/kind"
    entrypoint = get(doc, "spec.entrypoint", where)
    assert "python -m pipeline.tokenise" in " ".join(entrypoint.split()), f"{where}: spec.entrypoint"
    cluster = get(doc, "spec.rayClusterSpec", where)
    assert str(cluster.get("rayVersion")) == constraint_pin("ray"), (
        f"{where}: rayClusterSpec.rayVersion {cluster.get('rayVersion')} is not the pinned ray "
        f"{constraint_pin('ray')}")
    assert get(cluster, "authOptions.mode", where) == "token", f"{where}: Ray 2.60 token auth (authOptions.mode)"
    head = get(cluster, "headGroupSpec", where)
    groups = get(cluster, "workerGroupSpecs", where)
    assert isinstance(groups, list) and groups, f"{where}: rayClusterSpec.workerGroupSpecs is empty"
    for group in [head, *groups]:
        gwhere = f"{where}: group {group.get('groupName', 'head')}"
        params = get(group, "rayStartParams", gwhere)
        assert all(isinstance(v, str) for v in params.values()), f"{gwhere}: rayStartParams values must be strings"
        if group is not head:
            get(group, "groupName", gwhere)
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], f"{gwhere}: replicas"
        pod = get(group, "template.spec", gwhere)
        assert pod.get("containers"), f"{gwhere}: template.spec.containers is empty"
        for c in pod["containers"]:
            check_container(c, gwhere)
            check_s3_env(c, gwhere)
            check_shm(c, pod, gwhere)
            if gpus(c):
                assert c["resources"]["requests"].get("nvidia.com/gpu") == c["resources"]["limits"]["nvidia.com/gpu"], (
                    f"{gwhere}: nvidia.com/gpu requests must equal limits")
                assert "cuda" in c["image"], f"{gwhere}: GPU container {c['name']} runs a non-CUDA image {c['image']}"
    assert any(gpus(c) > 0 for g in groups for c in g["template"]["spec"]["containers"]), (
        f"{where}: no worker group asks for nvidia.com/gpu")
    (inv,) = file_invocations(DEPLOY / name)
    job = parse_module(inv, monkeypatch, capsys)
    assert job.out.startswith("s3://"), f"{where}: the tokens go to object storage (--out {job.out})"
    for group in [head, *groups]:
        pod = group["template"]["spec"]
        for c in pod["containers"]:
            vol = mounted_from(job.src, c, pod, f"{where}: --src {job.src}")
            assert "persistentVolumeClaim" in vol, f"{where}: --src {job.src} must be on a shared volume (a PVC)"


def test_pytorchjob_pretrain(monkeypatch, capsys):
    name = "k8s/pytorchjob-pretrain.yaml"
    (doc,) = k8s_docs(name)
    where = f"deploy/{name}"
    assert doc["apiVersion"] == "kubeflow.org/v1" and doc["kind"] == "PyTorchJob", f"{where}: apiVersion/kind"
    specs = get(doc, "spec.pytorchReplicaSpecs", where)
    assert set(specs) == {"Master", "Worker"}, f"{where}: pytorchReplicaSpecs must be Master and Worker"
    assert specs["Master"]["replicas"] == 1, f"{where}: one Master replica"
    nproc = int(get(doc, "spec.nprocPerNode", where))
    nodes = sum(s["replicas"] for s in specs.values())
    for role, spec in specs.items():
        rwhere = f"{where}: {role}"
        pod = get(spec, "template.spec", rwhere)
        (c,) = [c for c in pod["containers"] if c["name"] == "pytorch"] or [None]
        assert c is not None, f"{rwhere}: the training container must be named 'pytorch'"
        check_container(c, rwhere)
        check_s3_env(c, rwhere)
        check_shm(c, pod, rwhere)
        assert gpus(c) == nproc, f"{rwhere}: nvidia.com/gpu {gpus(c)} != spec.nprocPerNode {nproc}"
        assert c["resources"]["requests"].get("nvidia.com/gpu") == c["resources"]["limits"]["nvidia.com/gpu"], (
            f"{rwhere}: nvidia.com/gpu requests must equal limits")
        assert "cuda" in c["image"], f"{rwhere}: runs a non-CUDA image {c['image']}"
        assert c.get("command") or c.get("args"), f"{rwhere}: no command"
        invs = [i for i in file_invocations(DEPLOY / name)
                if i.launcher in ("torchrun", "deepspeed") and f"pytorchReplicaSpecs.{role}." in i.where]
        assert [i.module for i in invs] == ["pretrain.train"], (
            f"{rwhere}: expected one torchrun/deepspeed command running pretrain.train")
        (inv,) = invs
        if inv.launcher == "torchrun":
            assert int(inv.launcher_args.nproc_per_node) == nproc and int(inv.launcher_args.nnodes) == nodes, (
                f"{rwhere}: torchrun --nproc-per-node/--nnodes do not match the job's pods and GPUs")
        cfg, _ = parse_module(inv, monkeypatch, capsys)
        world = nproc * nodes
        assert cfg.data.partitions % world == 0, f"{rwhere}: world size {world} must divide data.partitions"
        assert (cfg.data.partitions // world) % cfg.data.num_workers == 0, (
            f"{rwhere}: data.num_workers {cfg.data.num_workers} leaves workers idle with "
            f"{cfg.data.partitions // world} partitions per rank")
        vol = mounted_from(cfg.run.out, c, pod, f"{rwhere}: --out {cfg.run.out}")
        assert "persistentVolumeClaim" in vol, f"{rwhere}: --out must be a shared (ReadWriteMany PVC) volume"
        workdir = c.get("workingDir", "")
        assert workdir == docker_workdir(), f"{rwhere}: workingDir {workdir!r} is not the images' WORKDIR"


def secret_template() -> dict:
    (doc,) = k8s_docs(SECRET_TEMPLATE)
    return doc


def test_secret_template():
    doc = secret_template()
    where = f"deploy/{SECRET_TEMPLATE}"
    assert doc["kind"] == "Secret" and doc["apiVersion"] == "v1", f"{where}: apiVersion/kind"
    assert doc["metadata"]["name"] == SECRET_NAME, f"{where}: metadata.name must be {SECRET_NAME}"
    assert "data" not in doc, f"{where}: use stringData with placeholders, not base64 data"
    values = get(doc, "stringData", where)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "REPLACE" in str(get(values, key, where)), f"{where}: stringData.{key} must be a REPLACE... placeholder"
    assert re.match(r"^https?://", values.get("VQPT_S3_ENDPOINT", "http://")), f"{where}: VQPT_S3_ENDPOINT is a URL"
    for path in files_of("rayjob") + files_of("pytorchjob") + files_of("minio-k8s"):
        for doc2 in load_yaml(path):
            for node in walk(doc2):
                if isinstance(node, dict) and "secretKeyRef" in node:
                    ref = node["secretKeyRef"]
                    assert ref.get("name") == SECRET_NAME and ref.get("key") in values, (
                        f"deploy/{rel(path)}: secretKeyRef {ref} names no key of the {SECRET_NAME} template")


def test_minio_k8s():
    name = "k8s/minio.yaml"
    where = f"deploy/{name}"
    docs = {d["kind"]: d for d in k8s_docs(name)}
    assert {"PersistentVolumeClaim", "Deployment", "Service"} <= set(docs), f"{where}: needs PVC, Deployment, Service"
    dep, svc, pvc = docs["Deployment"], docs["Service"], docs["PersistentVolumeClaim"]
    labels = get(dep, "spec.template.metadata.labels", where)
    selector = get(dep, "spec.selector.matchLabels", where)
    assert selector.items() <= labels.items(), f"{where}: Deployment selector does not match its pod labels"
    assert get(svc, "spec.selector", where).items() <= labels.items(), f"{where}: Service selects no MinIO pod"
    (c,) = get(dep, "spec.template.spec.containers", where)
    check_container(c, where)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for p in get(svc, "spec.ports", where):
        assert p["targetPort"] in ports or p["targetPort"] in ports.values(), (
            f"{where}: Service port {p} targets no container port")
    claims = [v["persistentVolumeClaim"]["claimName"] for v in dep["spec"]["template"]["spec"].get("volumes", [])
              if "persistentVolumeClaim" in v]
    assert claims == [pvc["metadata"]["name"]], f"{where}: the Deployment must mount the PVC {pvc['metadata']['name']}"
    for pod in pod_specs(list(docs.values())):
        for container in pod["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            for cred in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"):
                if cred in env or container is c:
                    get(env.get(cred, {}), "valueFrom.secretKeyRef", f"{where}: {container['name']} env {cred}")
    endpoint = secret_template()["stringData"]["VQPT_S3_ENDPOINT"]
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "s3")
    assert endpoint == f"http://{svc['metadata']['name']}:{port}", (
        f"{where}: the Secret's VQPT_S3_ENDPOINT {endpoint} does not point at this Service")
    if "Job" in docs:
        env = {e["name"]: e.get("value") for e in pod_specs(docs["Job"])[0]["containers"][0].get("env", [])}
        assert env.get("VQPT_BUCKET") in bucket_names(), f"{where}: the Job creates a bucket no command uses"


def bucket_names() -> set[str]:
    names = set()
    for path in deploy_files():
        names |= set(re.findall(r"s3://([a-z0-9][a-z0-9.-]+)/", path.read_text()))
    return names


def test_s3_urls_use_one_bucket():
    assert bucket_names() == {"vqpt-data"}, f"deploy/ uses buckets {bucket_names()}; MinIO creates vqpt-data"


# -- Ray cluster launcher -------------------------------------------------------------------------

def test_ray_cluster_yaml(monkeypatch, capsys):
    from ray.autoscaler._private.util import validate_config

    name = "ray/cluster.yaml"
    where = f"deploy/{name}"
    (cfg,) = load_yaml(DEPLOY / name)
    for key in ("cluster_name", "provider.type", "available_node_types", "head_node_type", "docker"):
        get(cfg, key, where)
    try:
        validate_config(cfg)
    except Exception as err:  # jsonschema.ValidationError
        raise AssertionError(f"{where}: Ray's cluster schema rejects it: {str(err).splitlines()[0]}") from None
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types, f"{where}: head_node_type {cfg['head_node_type']} is not a node type"
    gpu_types = [t for t, v in types.items() if v.get("resources", {}).get("GPU", 0) > 0]
    assert gpu_types, f"{where}: no node type with GPU resources"
    docker = cfg["docker"]
    for t, v in types.items():
        default = docker.get("head_image") if t == cfg["head_node_type"] else docker.get("worker_image")
        image = v.get("docker", {}).get("worker_image") or default or docker.get("image")
        assert image, f"{where}: node type {t} has no docker image"
        if t in gpu_types:
            assert "cuda" in image, f"{where}: GPU node type {t} runs a non-CUDA image {image}"
    for t in gpu_types:
        assert types[t].get("min_workers", 0) >= 1, (
            f"{where}: {t}.min_workers must be >= 1: the job counts GPUs once, at start")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(c for c in cfg[key] if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start, f"{where}: {key} must start Ray with RAY_AUTH_MODE=token"
        m = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+?);?\s", start)
        assert m and m.group(1) in cfg.get("file_mounts", {}), f"{where}: {key}: the token file is not in file_mounts"
    volumes = [opt.split()[1].split(":")[1] for opt in docker.get("run_options", []) if opt.startswith("-v ")]
    invs = file_invocations(DEPLOY / name)
    assert invs, f"{where}: no tokenise command in the comments"
    for inv in invs:
        job = parse_module(inv, monkeypatch, capsys)
        assert any(job.src == v or job.src.startswith(v + "/") for v in volumes), (
            f"{inv.where}: --src {job.src} is not under a volume of docker.run_options ({volumes})")


# -- MinIO compose --------------------------------------------------------------------------------

def test_minio_compose():
    name = "minio/docker-compose.yaml"
    where = f"deploy/{name}"
    (doc,) = load_yaml(DEPLOY / name)
    services = get(doc, "services", where)
    assert "minio" in services, f"{where}: no minio service"
    for sname, s in services.items():
        assert s.get("image"), f"{where}: services.{sname}.image"
        assert s.get("command") or s.get("entrypoint"), f"{where}: services.{sname} has no command"
    minio = services["minio"]
    assert "server" in minio["command"], f"{where}: services.minio.command must run `minio server`"
    get(minio, "healthcheck.test", where)
    for port in minio.get("ports", []):
        assert str(port).startswith("127.0.0.1:"), f"{where}: port {port} is published on every interface"
    jobs = [n for n, s in services.items() if n != "minio"]
    assert jobs, f"{where}: no one-shot service creating the bucket"
    for n in jobs:
        s = services[n]
        command = " ".join(s.get("entrypoint", []) + s.get("command", []))
        assert "mc mb" in command, f"{where}: services.{n} must create the bucket with `mc mb`"
        assert get(s, "depends_on.minio.condition", where) == "service_healthy", (
            f"{where}: services.{n} must wait for a healthy minio")
    for sname, s in services.items():
        for key, value in (s.get("environment") or {}).items():
            if key in CREDENTIAL_NAMES or key.startswith("MC_HOST_"):
                assert "${" in str(value), f"{where}: services.{sname}.environment.{key} must be interpolated"
    required = set(re.findall(r"\$\{(\w+):\?", (DEPLOY / name).read_text()))
    for template in files_of("env-template"):
        keys = set(env_file(template))
        assert required <= keys, f"deploy/{rel(template)} lacks {sorted(required - keys)} that {where} requires"
    default_bucket = re.search(r"\$\{VQPT_BUCKET:-([\w.-]+)\}", (DEPLOY / name).read_text())
    assert default_bucket and default_bucket.group(1) in bucket_names(), f"{where}: default bucket unused"


def env_file(path: Path) -> dict:
    out = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z_]\w*)=(.*)$", s)
        assert m, f"deploy/{rel(path)}:{i}: not NAME=value: {line!r}"
        out[m.group(1)] = m.group(2)
    return out


def test_env_templates():
    for path in files_of("env-template"):
        values = env_file(path)
        assert values, f"deploy/{rel(path)}: no variables"
        for key, value in values.items():
            if key in CREDENTIAL_NAMES:
                assert "REPLACE" in value, f"deploy/{rel(path)}: {key} must be a REPLACE... placeholder"


# -- DeepSpeed ------------------------------------------------------------------------------------

def hostfile_slots(path: Path) -> dict:
    from deepspeed.launcher.runner import fetch_hostfile

    for i, line in enumerate(path.read_text().splitlines(), 1):
        s = line.strip()
        assert not s or s.startswith("#") or re.match(r"^\S+\s+slots=\d+$", s), (
            f"deploy/{rel(path)}:{i}: not '<host> slots=<n>': {line!r}")
    slots = fetch_hostfile(str(path))
    assert slots, f"deploy/{rel(path)}: DeepSpeed finds no host in it"
    return dict(slots)


def test_hostfiles():
    for path in files_of("hostfile"):  # the template, and a user's copy if there is one
        slots = hostfile_slots(path)
        assert all(n >= 1 for n in slots.values()), f"deploy/{rel(path)}: a host with no slots"
    world = sum(hostfile_slots(DEPLOY / "deepspeed" / "hostfile.example").values())
    assert 64 % world == 0, f"deploy/deepspeed/hostfile.example: {world} slots do not divide the 64 stream partitions"


def embedded_scripts() -> list[tuple[str, str, str]]:
    """(where, shell, script) of the shell code inside YAML files: `sh -c` / `bash -c` container and
    compose commands, and the Ray cluster launcher's command lists."""
    out = []
    for path in deploy_files():
        if path.suffix != ".yaml" or kind_of(path) is None:
            continue
        for n, doc in enumerate(load_yaml(path)):
            for node in walk(doc):
                if not isinstance(node, dict):
                    continue
                argv = list(node.get("entrypoint") or []) + list(node.get("command") or [])
                if len(argv) >= 2 and isinstance(argv[0], str) and argv[0] in ("/bin/sh", "/bin/bash", "sh", "bash") \
                        and argv[1] == "-c":
                    scripts = argv[2:] or list(node.get("args") or [])[:1]
                    for script in scripts:
                        if kind_of(path) == "compose":
                            script = script.replace("$$", "$")  # compose's escape for a literal $
                        out.append((f"deploy/{rel(path)} (document {n + 1}, {node.get('name', 'container')})",
                                    PurePosixPath(argv[0]).name, script))
            if kind_of(path) == "ray-cluster":
                for key, commands in doc.items():
                    if key.endswith("_commands"):
                        out += [(f"deploy/{rel(path)} ({key}[{i}])", "bash", c) for i, c in enumerate(commands)]
    return out


def test_embedded_shell_scripts():
    scripts = embedded_scripts()
    assert any("pytorchjob" in w for w, _, _ in scripts), "the PyTorchJob's bash -c script was not found"
    shellcheck = shutil.which("shellcheck")
    for where, shell, script in scripts:
        done = subprocess.run([shell, "-n"], input=script, capture_output=True, text=True)
        assert done.returncode == 0, f"{where}: {shell} -n: {done.stderr}"
        if "k8s/" in where:
            assert not re.search(r"\$\(\w+\)", script), (
                f"{where}: Kubernetes would expand $(NAME) itself; use ${{NAME}}")
        if shellcheck:
            done = subprocess.run([shellcheck, "--shell", shell, "-e", "SC2148", "-"], input=script,
                                  capture_output=True, text=True)
            assert done.returncode == 0, f"{where}: shellcheck:\n{done.stdout}"


def test_pytorchjob_script_runs_torchrun(tmp_path, monkeypatch, capsys):
    """Run the PyTorchJob's bash -c script with a stand-in torchrun that records its argv, and the
    operator's PET_* variables: what the pod would really execute parses like the static reading."""
    (doc,) = load_yaml(DEPLOY / "k8s" / "pytorchjob-pretrain.yaml")
    (c,) = doc["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    script = (c.get("args") or c["command"][2:])[0]
    stub = tmp_path / "bin" / "torchrun"
    stub.parent.mkdir()
    stub.write_text('#!/usr/bin/env bash\nprintf \'%s\\0\' "$@" > "$ARGV_OUT"\n')
    stub.chmod(0o755)
    env = {"PATH": f"{stub.parent}:{os.environ['PATH']}", "ARGV_OUT": str(tmp_path / "argv"),
           "HOME": str(tmp_path), **injected_env(doc)}
    done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"deploy/k8s/pytorchjob-pretrain.yaml: the pod script fails: {done.stderr}"
    argv = (tmp_path / "argv").read_text().split("\0")[:-1]
    (inv,) = launch(["torchrun", *argv], "deploy/k8s/pytorchjob-pretrain.yaml (script run)")
    static = [i for i in file_invocations(DEPLOY / "k8s" / "pytorchjob-pretrain.yaml") if "Worker" in i.where]
    assert [inv.args] == [i.args for i in static], "the script's real argv differs from its static reading"
    cfg, resume = parse_module(inv, monkeypatch, capsys)
    assert resume is None and cfg.data.train.startswith("s3://"), "deploy/k8s/pytorchjob-pretrain.yaml: data/resume"


def test_shell_scripts_syntax():
    for path in files_of("shell"):
        where = f"deploy/{rel(path)}"
        done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert done.returncode == 0, f"{where}: bash -n: {done.stderr}"
        text = path.read_text()
        assert text.startswith("#!/usr/bin/env bash\n"), f"{where}: must start with #!/usr/bin/env bash"
        assert "set -euo pipefail" in text, f"{where}: must `set -euo pipefail`"
        code = [line.split("#", 1)[0] for line in text.splitlines()]
        assert not any(re.search(r"(^|[;&|(]\s*|\s)eval\s", line) for line in code), f"{where}: must not eval anything"


def test_shell_scripts_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    for path in files_of("shell"):
        done = subprocess.run([shellcheck, str(path)], capture_output=True, text=True)
        assert done.returncode == 0, f"deploy/{rel(path)}: shellcheck:\n{done.stdout}{done.stderr}"


LAUNCH = DEPLOY / "deepspeed" / "launch.sh"


def dry_run(tmp_path, *args, **env) -> subprocess.CompletedProcess:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    full = {"PATH": os.environ["PATH"], "HOME": str(home), "DRY_RUN": "1",
            "HOSTFILE": "deploy/deepspeed/hostfile.example", "CKPT_ROOT": str(tmp_path / "ckpt"), **env}
    return subprocess.run(["bash", str(LAUNCH), *args], capture_output=True, text=True, env=full, cwd=tmp_path,
                          timeout=60)


def launched(done: subprocess.CompletedProcess) -> list[Invocation]:
    assert done.returncode == 0, f"deploy/deepspeed/launch.sh DRY_RUN=1 failed: {done.stderr}"
    out = []
    for i, line in enumerate(done.stdout.splitlines(), 1):
        for argv in simple_commands(words(line)):
            out += launch(program(argv), f"deploy/deepspeed/launch.sh (dry run, command {i})")
    return out


def test_launch_sh_commands_parse(tmp_path, monkeypatch, capsys):
    invs = launched(dry_run(tmp_path, "optim.blr=1.0e-4"))
    assert [i.module for i in invs] == ["pretrain.train", "pretrain.finetune", "pretrain.evaluate"], (
        f"deploy/deepspeed/launch.sh: stages {[i.module for i in invs]}")
    hosts = hostfile_slots(DEPLOY / "deepspeed" / "hostfile.example")
    pre, ft, ev = invs
    for inv in (pre, ft):
        assert inv.launcher == "deepspeed", f"{inv.where}: not the deepspeed launcher"
        assert inv.launcher_args.hostfile == "deploy/deepspeed/hostfile.example", f"{inv.where}: --hostfile"
        assert inv.launcher_args.master_addr == next(iter(hosts)), f"{inv.where}: --master_addr is not the first host"
    pre_cfg, pre_resume = parse_module(pre, monkeypatch, capsys)
    ft_cfg, _ = parse_module(ft, monkeypatch, capsys)
    ev_args = parse_module(ev, monkeypatch, capsys)
    assert pre_resume is None, "deploy/deepspeed/launch.sh: --resume without a checkpoint"
    assert pre_cfg.optim.blr == 1.0e-4, "deploy/deepspeed/launch.sh: extra arguments must reach pre-training"
    assert ft_cfg.optim.blr != 1.0e-4, "deploy/deepspeed/launch.sh: extra arguments must not reach fine-tuning"
    world = sum(hosts.values())
    for cfg in (pre_cfg, ft_cfg):
        assert cfg.data.partitions % world == 0, f"launch.sh: world size {world} must divide data.partitions"
        assert (cfg.data.partitions // world) % cfg.data.num_workers == 0, (
            f"launch.sh: data.num_workers {cfg.data.num_workers} leaves workers idle")
    assert ft_cfg.objective["init"] == f"{pre_cfg.run.out}/backbone.pt", (
        f"launch.sh: fine-tuning starts from {ft_cfg.objective['init']}, not pre-training's backbone.pt")
    assert ft_cfg.model["preset"] == pre_cfg.model["preset"], "launch.sh: fine-tuning builds another ViT"
    assert ev_args.ckpt == f"{ft_cfg.run.out}/checkpoints", "launch.sh: evaluate reads another run's checkpoints"


def test_launch_sh_resumes_each_stage(tmp_path, monkeypatch, capsys):
    latest = tmp_path / "ckpt" / "mtm_vit_b" / "checkpoints" / "latest"
    latest.parent.mkdir(parents=True)
    latest.write_text("step0000010\n")
    pre, ft = launched(dry_run(tmp_path, STAGES="pretrain,finetune"))
    assert parse_module(pre, monkeypatch, capsys)[1] == "", f"{pre.where}: --resume (latest checkpoint) expected"
    assert parse_module(ft, monkeypatch, capsys)[1] is None, f"{ft.where}: fine-tuning has no checkpoint yet"
    (only,) = launched(dry_run(tmp_path, STAGES="evaluate"))
    assert only.module == "pretrain.evaluate", "launch.sh STAGES=evaluate"


@pytest.mark.parametrize("env", [{"PRETRAIN_BATCH": "128; rm -rf /"}, {"FT_STEPS": "1e5"}, {"MASTER_PORT": "x"},
                                 {"EVAL_DEVICE": "gpu"}, {"HOSTFILE": "deploy/deepspeed/no-such-hostfile"}])
def test_launch_sh_rejects_bad_settings(tmp_path, env):
    done = dry_run(tmp_path, **env)
    assert done.returncode == 2 and "launch.sh:" in done.stderr and not done.stdout, (
        f"deploy/deepspeed/launch.sh accepted {env}: rc {done.returncode}, {done.stdout!r} {done.stderr!r}")


def test_launch_sh_refuses_credentials_in_deepspeed_env(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".deepspeed_env").write_text("VQPT_S3_ENDPOINT=http://minio:9000\nAWS_SECRET_ACCESS_KEY=x\n")
    done = dry_run(tmp_path)
    assert done.returncode == 2 and "credentials" in done.stderr, (
        f"deploy/deepspeed/launch.sh ran with credentials in .deepspeed_env: {done.stderr!r}")


# -- Docker ---------------------------------------------------------------------------------------

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


def dockerignore(dockerfile_path: Path) -> list[str]:
    ignore = dockerfile_path.with_name(dockerfile_path.name + ".dockerignore")
    if not ignore.is_file():
        return []
    return [s.strip().rstrip("/") for s in ignore.read_text().splitlines() if s.strip() and not s.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for p in patterns:
        negate, p = p.startswith("!"), p.lstrip("!")
        if any(fnmatch.fnmatchcase(x, p) or fnmatch.fnmatchcase(x, p.removeprefix("**/"))
               or (p.startswith("**/") and fnmatch.fnmatchcase(PurePosixPath(x).name, p[3:])) for x in prefixes):
            result = not negate
    return result


def docker_workdir() -> str:
    workdirs = {rest for p in files_of("dockerfile") for _, name, rest in dockerfile(p) if name == "WORKDIR"}
    assert len(workdirs) == 1, f"deploy/docker: the images disagree on WORKDIR ({workdirs})"
    return workdirs.pop()


def test_dockerfiles():
    torch_pin = constraint_pin("torch")
    for path in files_of("dockerfile"):
        where = f"deploy/{rel(path)}"
        ins = dockerfile(path)
        first = next((x for x in ins if x[1] != "ARG"), None)
        assert first and first[1] == "FROM", f"{where}: the first instruction (after ARGs) must be FROM"
        patterns = dockerignore(path)
        copied = []
        for line, name, rest in ins:
            if name not in ("COPY", "ADD"):
                continue
            parts = [p for p in (yaml.safe_load(rest) if rest.startswith("[") else shlex.split(rest))]
            if any(p.startswith("--from") for p in parts):
                continue
            sources = [p for p in parts if not p.startswith("--")][:-1]
            assert sources, f"{where}:{line}: {name} without a source"
            for src in sources:
                assert list(ROOT.glob(src)), f"{where}:{line}: {name} source {src} does not exist in the repository"
                assert not ignored(src, patterns), f"{where}:{line}: {name} source {src} is excluded by .dockerignore"
                copied.append(src.rstrip("/"))
        for needed in ("constraints.txt", "pyproject.toml", "README.md", "storage", "pipeline", "pretrain", "vqpt",
                       "configs"):
            assert needed in copied, f"{where}: does not COPY {needed} (the install or the manifests need it)"
        runs = [rest for _, name, rest in ins if name == "RUN"]
        assert any(re.search(r"pip install -c constraints\.txt \.(\s|$)", r) for r in runs), (
            f"{where}: must install the project with `pip install -c constraints.txt .` (README's set-up path)")
        pins = re.findall(r"\btorch==([\w.+]+)", " ".join(runs))
        assert pins and set(pins) == {torch_pin}, f"{where}: installs torch {pins}, constraints.txt pins {torch_pin}"
        assert all("-c constraints.txt" in r for r in runs if "pip install" in r), (
            f"{where}: every pip install must pass -c constraints.txt")
        users = [rest for _, name, rest in ins if name == "USER"]
        assert users and users[-1] not in ("root", "0"), f"{where}: must end as an unprivileged USER"
    cpu = dockerfile(DEPLOY / "docker" / "Dockerfile.cpu")
    assert next(r for _, n, r in cpu if n == "FROM").startswith("python:3.11"), "Dockerfile.cpu: FROM python:3.11-slim"
    cuda = (DEPLOY / "docker" / "Dockerfile.cuda").read_text()
    assert re.search(r"ARG CUDA_IMAGE=(nvidia/cuda|pytorch/pytorch):", cuda), "Dockerfile.cuda: a CUDA base image"
    assert "python3.11" in cuda, "Dockerfile.cuda: Python 3.11, as the CPU image (one Ray cluster, one Python)"


def test_dockerignores():
    for path in files_of("dockerignore"):
        where = f"deploy/{rel(path)}"
        owner = path.with_name(path.name.removesuffix(".dockerignore"))
        assert owner.is_file(), f"{where}: no Dockerfile {owner.name} beside it"
        patterns = dockerignore(owner)
        for must in (".venv", ".git", "out", "runs"):
            assert ignored(must, patterns), f"{where}: must exclude {must}"


# -- README ---------------------------------------------------------------------------------------

def test_readme_names_every_deploy_file():
    text = (DEPLOY / "README.md").read_text()
    missing = [f"deploy/{rel(p)}" for p in deploy_files() if p.name != "README.md" and f"deploy/{rel(p)}" not in text]
    assert not missing, f"deploy/README.md does not mention {missing}"
    for topic in ("ZeRO-3", "Sizing", "Credentials", "Ports", "secretKeyRef"):
        assert topic in text, f"deploy/README.md: no {topic!r}"
