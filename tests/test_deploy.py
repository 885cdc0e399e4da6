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
``test_every_deploy_file_is_validated``. The shared machinery is in ``tests/deploy_support.py``; the
Ray cluster launcher, MinIO compose, DeepSpeed and Docker checks in ``tests/test_deploy_launchers.py``.
"""

from __future__ import annotations

import re

import pytest

from tests.deploy_support import (
    CREDENTIAL_NAMES,
    DEPLOY,
    ROOT,
    VALIDATED_MODULES,
    bucket_names,
    constraint_pin,
    deploy_files,
    docker_workdir,
    file_invocations,
    files_of,
    get,
    kind_of,
    load_yaml,
    parse_module,
    rel,
    walk,
)

REQUIRED = ["README.md", "ray/cluster.yaml", "k8s/rayjob-tokenise.yaml", "k8s/pytorchjob-pretrain.yaml",
            "k8s/s3-credentials.example.yaml", "k8s/minio.yaml", "minio/docker-compose.yaml",
            "deepspeed/hostfile.example", "deepspeed/launch.sh", "docker/Dockerfile.cpu", "docker/Dockerfile.cuda"]
EXPECTED_MODULES = {
    "README.md": set(VALIDATED_MODULES),
    "ray/cluster.yaml": {"pipeline.tokenise"},
    "k8s/rayjob-tokenise.yaml": {"pipeline.tokenise"},
    "k8s/pytorchjob-pretrain.yaml": {"pretrain.train"},
}
SECRET_NAME = "vqpt-s3"
SECRET_TEMPLATE = "k8s/s3-credentials.example.yaml"
# Paths the docs name that the user creates (a copy of a template), not files of the repository.
USER_CREATED = {"deploy/deepspeed/hostfile"}


# -- coverage and generic checks ------------------------------------------------------------------

def test_every_deploy_file_is_validated():
    missing = [f"deploy/{name}" for name in REQUIRED if not (DEPLOY / name).is_file()]
    assert not missing, f"required deploy files are missing: {missing}"
    unknown = [f"deploy/{rel(p)}" for p in deploy_files() if kind_of(p) is None]
    assert not unknown, (f"no test validates {unknown}: add the file's pattern to KINDS in tests/deploy_support.py "
                         f"and its checks to tests/test_deploy*.py (or remove the file)")


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



def test_s3_urls_use_one_bucket():
    assert bucket_names() == {"vqpt-data"}, f"deploy/ uses buckets {bucket_names()}; MinIO creates vqpt-data"



# -- README ---------------------------------------------------------------------------------------

def test_readme_names_every_deploy_file():
    text = (DEPLOY / "README.md").read_text()
    missing = [f"deploy/{rel(p)}" for p in deploy_files() if p.name != "README.md" and f"deploy/{rel(p)}" not in text]
    assert not missing, f"deploy/README.md does not mention {missing}"
    for topic in ("ZeRO-3", "Sizing", "Credentials", "Ports", "secretKeyRef"):
        assert topic in text, f"deploy/README.md: no {topic!r}"
