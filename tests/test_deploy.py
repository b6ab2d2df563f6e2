"""The recipes in deploy/ checked statically: they parse, every gapaware command line and
GAPAWARE_* variable in them is accepted by the real CLI (so a renamed flag breaks the
build, not a cluster), and compose and Kubernetes agree on ports and paths."""
from __future__ import annotations

import configparser
import json
import re
import shlex
import subprocess
from pathlib import Path, PurePosixPath

import click
import pytest
import yaml

from gapaware.cli import main
from tests.invocations import envvars_of, parse_invocation

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
# Variables the recipes already set for flags that other branches add. Each is ignored
# until its flag exists; once it does, this test asks for its removal from here.
PENDING = {
}
SHELL_END = re.compile(r"^(&&?|\|\|?|;;?|\d*>.*|<.*)$")


def deploy_files(*suffixes: str) -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and (not suffixes or p.name.endswith(suffixes)))


def load_yaml(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc]


def dockerfile() -> dict[str, list[str]]:
    """Instruction -> arguments of each occurrence, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, rest = line.strip().partition(" ")
            out.setdefault(instruction.upper(), []).append(rest.strip())
    return out


def docker_env(prefix: str = "GAPAWARE_") -> dict[str, str]:
    env = {}
    for line in dockerfile().get("ENV", []):
        env.update(dict(item.split("=", 1) for item in shlex.split(line)))
    return {k: v for k, v in env.items() if k.startswith(prefix)}


def compose_services() -> dict[str, dict]:
    """The services of docker-compose.yml with the GPU overlay's environment merged in."""
    services = load_yaml("docker-compose.yml")[0]["services"]
    for name, overlay in load_yaml("docker-compose.gpu.yml")[0]["services"].items():
        services[name]["environment"] = {**services[name]["environment"], **overlay.get("environment", {})}
    return services


def sharded_compose_services() -> dict[str, dict]:
    return load_yaml("docker-compose.sharded.yml")[0]["services"]


def sharded_k8s_objects() -> list[dict]:
    return [doc for name in ("kubernetes/sharded/shards.yaml", "kubernetes/sharded/workers.yaml")
            for doc in load_yaml(name)]


def k8s_objects() -> list[dict]:
    return [doc for name in ("kubernetes/server.yaml", "kubernetes/worker.yaml") for doc in load_yaml(name)]


def k8s(kind: str, name: str) -> dict:
    return next(o for o in k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name)


def container_env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def shell_command_lines(path: Path) -> list[list[str]]:
    """The words of each ``gapaware ...`` command in a shell script, up to the first redirection
    or operator; comment lines are skipped, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines, logical = [], ""
    for line in text.splitlines():
        if not logical and line.lstrip().startswith("#"):
            continue
        logical += line + "\n"
        try:
            words = shlex.split(logical)
        except ValueError:  # a quote that closes on a later line
            continue
        logical = ""
        for start, word in enumerate(words):
            if word == "gapaware" or word.endswith("/gapaware"):
                args = []
                for w in words[start + 1:]:
                    if SHELL_END.match(w):
                        break
                    args.append(w)
                lines.append(args)
    return lines


def shell_exports(path: Path, prefix: str = "GAPAWARE_") -> dict[str, str]:
    """The ``export GAPAWARE_X=...`` of a script (or those of another ``prefix``), ``${X:-default}``
    taken as its default."""
    exports = re.findall(rf"^export ({prefix}[A-Z0-9_]+)=(.*)$", path.read_text(), flags=re.MULTILINE)
    return {name: re.sub(r"\$\{[A-Z0-9_]+:-(.*)\}", r"\1", shlex.split(value)[0]) for name, value in exports}


def systemd_unit(path: Path) -> tuple[list[str], dict[str, str]]:
    """ExecStart's arguments after gapaware, and the variables of its EnvironmentFiles (the
    examples of the same name in deploy/systemd)."""
    lines = [line.partition("=") for line in path.read_text().splitlines() if not line.startswith("#")]
    words = shlex.split(next(value for key, _, value in lines if key == "ExecStart"))
    assert words[0].endswith("/gapaware"), f"{path.name}: ExecStart should run gapaware: {words}"
    env = {}
    for key, _, value in lines:
        if key == "EnvironmentFile":
            env.update(env_file(DEPLOY / "systemd" / PurePosixPath(value.lstrip("-")).name))
    return words[1:], env


def env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))


def invocations() -> list[tuple[str, list[str], dict[str, str]]]:
    """(where, arguments after ``gapaware``, the GAPAWARE_* environment it runs with)."""
    found = []
    image_env = docker_env()
    docker = dockerfile()
    assert json.loads(docker["ENTRYPOINT"][-1]) == ["gapaware"], "the image's entrypoint is the gapaware CLI"
    found.append(("Dockerfile CMD", json.loads(docker["CMD"][-1]), image_env))
    for name, service in compose_services().items():
        env = {**image_env, **{k: str(v) for k, v in service["environment"].items()}}
        found.append((f"compose {name}", service["command"], env))
        check = service.get("healthcheck", {}).get("test")
        if check:
            assert check[:2] == ["CMD", "gapaware"], check
            found.append((f"compose {name} healthcheck", check[2:], env))
    for obj in k8s_objects():
        if obj["kind"] == "Deployment":
            for container in obj["spec"]["template"]["spec"]["containers"]:
                assert "command" not in container, "containers run the image's gapaware entrypoint"
                found.append((f"kubernetes {obj['metadata']['name']}", container["args"],
                              {**image_env, **container_env(container)}))
    for name, service in sharded_compose_services().items():
        env = {**image_env, **{k: str(v) for k, v in service["environment"].items()}}
        found.append((f"compose sharded {name}", service["command"], env))
        if "healthcheck" in service:
            found.append((f"compose sharded {name} healthcheck", service["healthcheck"]["test"][2:], env))
    for obj in sharded_k8s_objects():
        if obj["kind"] in ("Deployment", "StatefulSet"):
            container = obj["spec"]["template"]["spec"]["containers"][0]
            assert "command" not in container, "containers run the image's gapaware entrypoint"
            for index in range(obj["spec"]["replicas"] if obj["kind"] == "StatefulSet" else 1):
                env = {k: v.replace("$(POD_INDEX)", str(index)) for k, v in container_env(container).items()}
                found.append((f"kubernetes {obj['metadata']['name']} pod {index}", container["args"],
                              {**image_env, **env}))
    for path in deploy_files(".service"):
        found.append((f"systemd {path.name}", *systemd_unit(path)))
    for path in deploy_files(".sh", ".sbatch"):
        exports = shell_exports(path)
        found += [(f"{path.relative_to(DEPLOY)}", [expand(word, exports) for word in args], exports)
                  for args in shell_command_lines(path)]
    return found


def expand(word: str, exports: dict[str, str]) -> str:
    """``word`` with the script's own exported variables (``$GAPAWARE_SERVER``) replaced by their values."""
    return re.sub(r"\$\{?([A-Z0-9_]+)\}?", lambda m: exports.get(m.group(1), m.group(0)), word)


INVOCATIONS = invocations()


def without_pending(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in PENDING}


def test_every_yaml_file_parses():
    files = deploy_files(".yml", ".yaml")
    assert len(files) >= 5
    for path in files:
        docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        assert docs and all(isinstance(doc, dict) for doc in docs), path


def test_every_recipe_has_gapaware_command_lines():
    places = {where.split()[0] for where, _, _ in INVOCATIONS}
    assert places >= {"Dockerfile", "compose", "kubernetes", "systemd", "slurm/gapaware.sbatch", "ssh/cluster.sh"}
    commands = {args[0] for _, args, _ in INVOCATIONS}
    assert commands >= {"server", "worker", "health", "status", "plot"}


@pytest.mark.parametrize("where,args,env", INVOCATIONS, ids=[f"{w}: {' '.join(a)}" for w, a, _ in INVOCATIONS])
def test_every_gapaware_command_line_in_deploy_is_accepted_by_the_cli(where, args, env, tmp_path, monkeypatch):
    # A script's "$RUN_DIR/metrics.jsonl" exists only at run time: make such words exist
    # here (a file when named with a suffix, else a directory), so that what is checked is the
    # flags and their values.
    monkeypatch.chdir(tmp_path)
    for word in args:
        if "$" in word and not word.startswith("-"):
            (tmp_path / word).parent.mkdir(parents=True, exist_ok=True)
            if PurePosixPath(word).suffix:
                (tmp_path / word).touch()
            else:
                (tmp_path / word).mkdir(exist_ok=True)
    try:
        parse_invocation(args, without_pending(env))
    except click.ClickException as error:
        pytest.fail(f"{where}: `gapaware {' '.join(args)}` is refused: {error.format_message()}")


def test_every_gapaware_variable_in_deploy_is_a_flag_or_pending():
    known = set().union(*(envvars_of(command) for command in main.commands))
    arrived = sorted(set(PENDING) & known)
    assert not arrived, f"{arrived} are real flags now: remove them from PENDING in {Path(__file__).name}"
    for path in deploy_files():
        for name in set(re.findall(r"\bGAPAWARE_[A-Z0-9_]+", path.read_text())):
            assert name in known or name in PENDING, f"{path.relative_to(ROOT)}: {name} is no gapaware flag's variable"


def test_each_service_is_given_only_variables_its_command_reads():
    for where, args, env in INVOCATIONS:
        if where.startswith(("compose", "kubernetes")) and not where.endswith("healthcheck"):
            stray = set(without_pending(env)) - envvars_of(args[0]) - set(docker_env())
            assert not stray, f"{where}: `gapaware {args[0]}` has no flag for {sorted(stray)}"


def params_of(where: str) -> dict:
    where_, args, env = next(i for i in INVOCATIONS if i[0] == where)
    return parse_invocation(args, without_pending(env))[1]


def under(path: str, directory: str) -> bool:
    return PurePosixPath(directory) in PurePosixPath(path).parents


def test_compose_and_kubernetes_agree_on_ports():
    compose, kube = params_of("compose server"), params_of("kubernetes gapaware-server")
    port, metrics_port = compose["port"], compose["metrics_port"]
    assert (kube["port"], kube["metrics_port"]) == (port, metrics_port)
    assert {int(p) for p in dockerfile()["EXPOSE"][-1].split()} == {port, metrics_port}
    assert set(compose_services()["server"]["ports"]) == {f"{port}:{port}", f"{metrics_port}:{metrics_port}"}
    assert params_of("compose server healthcheck")["address"] == f"127.0.0.1:{port}"
    assert params_of("compose worker")["address"] == f"server:{port}"

    deployment = k8s("Deployment", "gapaware-server")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named == {"grpc": port, "metrics": metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port, probe
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(metrics_port)
    service = k8s("Service", "gapaware-server")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert {n: named[p["targetPort"]] for n, p in by_name.items()} == named
    assert params_of("kubernetes gapaware-worker")["address"] == f"gapaware-server:{by_name['grpc']['port']}"
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > kube["linger"], \
        "NOT_SERVING during the linger must not get the server killed"


def test_compose_and_kubernetes_agree_on_volume_and_secret_paths():
    compose_server = compose_services()["server"]
    volume, mount = compose_server["volumes"][0].split(":")[:2]
    assert volume in load_yaml("docker-compose.yml")[0]["volumes"]
    assert dockerfile()["VOLUME"][-1].split() == [mount]

    deployment = k8s("Deployment", "gapaware-server")
    pod = deployment["spec"]["template"]["spec"]
    claim = k8s("PersistentVolumeClaim", "gapaware-data")["metadata"]["name"]
    data_volume = next(v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == claim)
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts[data_volume] == mount

    compose_env = compose_server["environment"]
    kube_env = container_env(pod["containers"][0])
    for name in ("GAPAWARE_METRICS_FILE", "GAPAWARE_TENSORBOARD", "GAPAWARE_CHECKPOINT_DIR"):
        assert compose_env[name] == kube_env[name] and under(compose_env[name], mount), name

    for service in ("server", "worker"):
        secret = compose_services()[service]["secrets"][0]
        assert compose_services()[service]["environment"]["GAPAWARE_TOKEN_FILE"] == f"/run/secrets/{secret}"
        assert secret in load_yaml("docker-compose.yml")[0]["secrets"]
    for name in ("gapaware-server", "gapaware-worker"):
        pod = k8s("Deployment", name)["spec"]["template"]["spec"]
        secret_volume = next(v["name"] for v in pod["volumes"] if "secret" in v)
        mount_path = next(m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"] == secret_volume)
        assert under(container_env(pod["containers"][0])["GAPAWARE_TOKEN_FILE"], mount_path), name


def test_every_recipe_opts_into_the_same_allocator_tuning_the_readme_describes():
    """The image (compose, Kubernetes), the systemd environment (the VMs) and the SLURM script set
    glibc's MALLOC_* variables alike, as the README's line does."""
    image = docker_env("MALLOC_")
    assert image, "the image sets no MALLOC_* variable"
    systemd = {k: v for k, v in env_file(DEPLOY / "systemd" / "gapaware.env").items() if k.startswith("MALLOC_")}
    slurm = shell_exports(DEPLOY / "slurm" / "gapaware.sbatch", prefix="MALLOC_")
    assert systemd == image and slurm == image
    readme = (ROOT / "README.md").read_text()
    assert "export " + " ".join(f"{k}={v}" for k, v in image.items()) in readme


def test_kubernetes_runs_one_server_and_gpu_workers():
    server = k8s("Deployment", "gapaware-server")["spec"]
    assert server["replicas"] == 1 and server["strategy"]["type"] == "Recreate"
    worker = k8s("Deployment", "gapaware-worker")["spec"]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert params_of("kubernetes gapaware-worker")["device"] == "cuda:0"
    kustomization = load_yaml("kubernetes/kustomization.yaml")[0]
    assert sorted(kustomization["resources"]) == ["server.yaml", "worker.yaml"]


def test_the_image_holds_every_package_folder():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    folders = {line.split("=")[1].strip().split("/")[0]
               for line in setup["options"]["package_dir"].strip().splitlines()}
    copied = {line.split()[0] for line in dockerfile()["COPY"]}
    assert folders <= copied, f"deploy/Dockerfile does not COPY {sorted(folders - copied)}"
    admitted = {line[1:] for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
                if line.startswith("!")}
    assert folders <= admitted, f"deploy/Dockerfile.dockerignore keeps out {sorted(folders - admitted)}"


@pytest.mark.parametrize("script", deploy_files(".sh", ".sbatch"), ids=lambda p: p.name)
def test_shell_scripts_have_valid_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_sharded_recipes_list_every_shard_in_order_with_stable_names():
    """Kubernetes: a StatefulSet of S pods whose index is their shard, reached through a headless Service by
    name; compose: one service per shard; SLURM: one server per head node. The workers list every shard in
    shard order, and each shard keeps checkpoints of its own that it resumes from."""
    shards = k8s_objects_of("StatefulSet", "gapaware-shard")
    count = shards["spec"]["replicas"]
    service = next(o for o in sharded_k8s_objects() if o["kind"] == "Service")
    assert service["spec"]["clusterIP"] == "None" and shards["spec"]["serviceName"] == service["metadata"]["name"]
    assert shards["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    port = params_of("kubernetes gapaware-shard pod 0")["port"]
    for index in range(count):
        params = params_of(f"kubernetes gapaware-shard pod {index}")
        assert str(params["shard"]) == f"{index}/{count}" and params["resume"] == params["checkpoint_dir"]
    addresses = params_of("kubernetes gapaware-sharded-worker pod 0")["address"].split(",")
    assert addresses == [f"gapaware-shard-{i}.gapaware-shard:{port}" for i in range(count)]

    compose = sharded_compose_services()
    servers = [name for name, s in compose.items() if s["command"] == ["server"]]
    for index, name in enumerate(servers):
        params = params_of(f"compose sharded {name}")
        assert str(params["shard"]) == f"{index}/{len(servers)}" and params["resume"] == params["checkpoint_dir"]
        assert compose[name]["volumes"] == [f"{name}-data:/data"]
    worker = params_of("compose sharded worker")["address"].split(",")
    assert worker == [f"{name}:{params_of(f'compose sharded {name}')['port']}" for name in servers]

    sbatch = (DEPLOY / "slurm" / "gapaware.sbatch").read_text()
    assert 'GAPAWARE_SHARD="$I/$SHARDS" srun' in sbatch and "--checkpoint-dir \"$SHARD_DIR/checkpoints\"" in sbatch


def k8s_objects_of(kind: str, name: str) -> dict:
    return next(o for o in sharded_k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name)
