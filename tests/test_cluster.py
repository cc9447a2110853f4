"""The deployment files under cluster/, checked without a cluster.

Each check is one a platform engineer would otherwise find at deploy time: Ray's own
validator on the launcher config, the fields KubeRay requires, secrets kept out of
manifests, one Ray version everywhere, and every `slmbatch run <job file>` naming a real
console script, subcommand and job file. tests/test_ray_job_submit.py runs the CronJob's
script against a real Ray head.
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import ray
import yaml

from slmbatch.cli import build_parser, load_job

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
LAUNCHER = CLUSTER / "ray-cluster-gpu.yaml"
RAYJOB = CLUSTER / "kuberay-rayjob.yaml"
RAYCLUSTER = CLUSTER / "kuberay-raycluster.yaml"
CRONJOB = CLUSTER / "nightly-cronjob.yaml"
CRONTAB = CLUSTER / "crontab.example"
SERVICE = CLUSTER / "systemd" / "slmbatch-nightly.service"
TIMER = CLUSTER / "systemd" / "slmbatch-nightly.timer"
DOCKERFILE = CLUSTER / "Dockerfile"
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.I)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def cronjob_container() -> dict:
    return load(CRONJOB)["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]


def cronjob_script() -> str:
    """The shell script the CronJob's container runs (``bash -c SCRIPT``)."""
    container = cronjob_container()
    command = [*container["command"], *container.get("args", [])]
    assert command[:2] == ["/bin/bash", "-c"] and len(command) == 3, command
    return command[2]


def pod_specs(manifest: dict) -> list[dict]:
    """Every pod spec in a RayJob / RayCluster / CronJob manifest."""
    kind, spec = manifest["kind"], manifest["spec"]
    if kind == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    cluster = spec["rayClusterSpec"] if kind == "RayJob" else spec
    return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]


def k8s_manifests() -> list[dict]:
    return [load(p) for p in (RAYJOB, RAYCLUSTER, CRONJOB)]


# -- every file ------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_yaml_file_under_cluster_parses_to_a_mapping(path):
    documents = list(yaml.safe_load_all(path.read_text()))
    assert documents and all(isinstance(d, dict) for d in documents)


def test_every_file_under_cluster_is_documented_in_its_readme():
    readme = (CLUSTER / "README.md").read_text()
    for path in CLUSTER.rglob("*"):
        if path.is_file() and path.name != "README.md":
            name = path.name if path.parent == CLUSTER else "systemd/slmbatch-nightly."
            assert name in readme, f"cluster/README.md does not mention {path.relative_to(CLUSTER)}"


# -- cluster launcher ------------------------------------------------------------------


def validate_like_ray_up(config: dict) -> dict:
    """What `ray up` does before it calls the cloud: fill in the provider's defaults, then
    Ray's own validator (its JSON schema, ray/autoscaler/ray-schema.json, plus its checks)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_launcher_config_passes_rays_own_validation():
    prepared = validate_like_ray_up(load(LAUNCHER))
    gpu = [t for t in prepared["available_node_types"].values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu, "no GPU worker type"
    assert all(0 <= t["min_workers"] <= t["max_workers"] <= prepared["max_workers"] for t in gpu)
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # the head runs the driver, not tasks


def break_typo(c):
    c["available_node_types"]["ray.worker.gpu"]["max_worker"] = 4  # unknown key (schema)


def break_fractional_gpu(c):
    c["available_node_types"]["ray.worker.gpu"]["resources"]["GPU"] = 0.5  # integers only (schema)


def break_head_type(c):
    c["head_node_type"] = "ray.head.missing"  # not a node type (validator)


def break_min_workers(c):
    c["available_node_types"]["ray.worker.gpu"]["min_workers"] = c["max_workers"] + 1  # over the cap (validator)


@pytest.mark.parametrize(
    "breakage", [break_typo, break_fractional_gpu, break_head_type, break_min_workers], ids=lambda f: f.__name__
)
def test_a_broken_copy_of_the_launcher_config_fails_rays_validation(breakage):
    import jsonschema

    config = load(LAUNCHER)
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_like_ray_up(config)


# -- KubeRay ---------------------------------------------------------------------------


def check_ray_cluster_spec(cluster: dict) -> None:
    head = cluster["headGroupSpec"]
    assert head["template"]["spec"]["containers"], "head pod has no containers"
    assert "rayStartParams" in head
    assert cluster["workerGroupSpecs"], "no worker group"
    for group in cluster["workerGroupSpecs"]:
        for field in ("groupName", "replicas", "minReplicas", "maxReplicas", "template", "rayStartParams"):
            assert field in group, f"worker group lacks {field}"
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["template"]["spec"]["containers"]
    gpus = [
        c["resources"]["limits"].get("nvidia.com/gpu", 0)
        for g in cluster["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
    ]
    assert any(g >= 1 for g in gpus), "no GPU worker group"


def test_rayjob_has_the_fields_kuberay_requires():
    job = load(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("slmbatch run ")
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) <= {"working_dir", "env_vars", "pip", "py_modules"}
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values()), "runtime env values must be strings"
    check_ray_cluster_spec(spec["rayClusterSpec"])


def test_raycluster_is_the_rayjobs_cluster_with_gpu_workers_scaled_from_zero():
    cluster = load(RAYCLUSTER)
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    check_ray_cluster_spec(cluster["spec"])
    ours, theirs = copy.deepcopy(cluster["spec"]), copy.deepcopy(load(RAYJOB)["spec"]["rayClusterSpec"])
    assert [g.pop("replicas") for g in ours["workerGroupSpecs"]] == [0] * len(ours["workerGroupSpecs"])
    for g in theirs["workerGroupSpecs"]:
        g.pop("replicas")
    assert ours == theirs


def test_no_secret_is_inline_and_the_api_key_comes_from_a_secret():
    from_secret = []
    for manifest in k8s_manifests():
        for pod in pod_specs(manifest):
            for container in pod["containers"]:
                for var in container.get("env", []):
                    if SECRET_NAME.search(var["name"]):
                        assert "value" not in var, f"{manifest['kind']}: {var['name']} is inline"
                        assert "secretKeyRef" in var["valueFrom"], var
                        from_secret.append(var["name"])
    assert "OPENAI_API_KEY" in from_secret
    runtime_env = yaml.safe_load(load(RAYJOB)["spec"]["runtimeEnvYAML"])
    assert not [k for k in runtime_env["env_vars"] if SECRET_NAME.search(k)], "secret in a runtime env"


def test_one_image_and_one_ray_version_everywhere_equal_to_the_installed_ray():
    version = ray.__version__
    images = {c["image"] for m in k8s_manifests() for pod in pod_specs(m) for c in pod["containers"]}
    assert len(images) == 1, images
    assert load(RAYJOB)["spec"]["rayClusterSpec"]["rayVersion"] == version
    assert load(RAYCLUSTER)["spec"]["rayVersion"] == version
    launcher = load(LAUNCHER)
    assert launcher["docker"]["image"].startswith(f"rayproject/ray:{version}-")
    assert any(f'"ray[data,default]=={version}"' in cmd for cmd in launcher["setup_commands"])
    assert f"ARG RAY_VERSION={version}\n" in DOCKERFILE.read_text()


def test_dockerfile_copies_files_that_exist_to_the_working_dir_the_manifests_upload():
    text = DOCKERFILE.read_text()
    copies = [line.split()[1:] for line in text.splitlines() if line.startswith("COPY ")]
    assert copies
    for args in copies:
        sources = [a for a in args[:-1] if not a.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
    workdir = re.search(r"^WORKDIR (\S+)$", text, re.M).group(1)
    assert yaml.safe_load(load(RAYJOB)["spec"]["runtimeEnvYAML"])["working_dir"] == workdir
    assert {v["name"]: v.get("value") for v in cronjob_container()["env"]}["JOB_WORKDIR"] == workdir
    assert f"{workdir}/jobs" in text


# -- CronJob ---------------------------------------------------------------------------


def test_cronjob_has_a_schedule_a_job_template_and_a_command():
    cron = load(CRONJOB)
    assert cron["apiVersion"] == "batch/v1" and cron["kind"] == "CronJob"
    assert len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    assert pod["containers"][0]["command"]


def test_cronjob_submits_with_a_deterministic_id_and_waits():
    script = cronjob_script()
    subprocess.run(["bash", "-n", "-c", script], check=True)  # parses
    assert 'id="slmbatch-support-intents-${day}"' in script and "date -u +%F" in script
    submit = re.search(r"ray job submit (.*?)-- slmbatch run", script, re.S).group(1)
    assert '--submission-id "$id"' in submit and '--address "$RAY_ADDRESS"' in submit
    assert "--no-wait" not in submit  # success is the waiting submit's exit status


def test_cronjob_submits_to_the_head_service_of_the_raycluster():
    address = {v["name"]: v.get("value") for v in cronjob_container()["env"]}["RAY_ADDRESS"]
    cluster = load(RAYCLUSTER)["metadata"]
    assert re.fullmatch(
        rf"http://{cluster['name']}-head-svc\.{cluster['namespace']}\.svc\.cluster\.local:8265", address
    )


# -- single machine --------------------------------------------------------------------


def crontab_entries() -> list[str]:
    return [line for line in CRONTAB.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_crontab_line_has_five_schedule_fields_and_a_command_that_parses():
    (entry,) = crontab_entries()
    *schedule, command = entry.split(None, 5)
    assert len(schedule) == 5
    for field in schedule:
        assert re.fullmatch(r"(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*", field), field
    assert re.search(r"(?<!\\)%", command) is None, "an unescaped % ends a cron command"
    subprocess.run(["sh", "-n", "-c", command.replace("\\%", "%")], check=True)


def unit_file(path: Path) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
        else:
            key, _, value = line.partition("=")
            current.append((key, value))
    return sections


def test_systemd_timer_and_service_refer_to_each_other():
    timer, service = unit_file(TIMER), unit_file(SERVICE)
    assert dict(timer["Timer"])["Unit"] == SERVICE.name
    assert "OnCalendar" in dict(timer["Timer"]) and dict(timer["Install"])["WantedBy"] == "timers.target"
    assert "Install" not in service, "the service is started by its timer only"
    assert TIMER.name in dict(service["Unit"])["Description"]
    assert dict(service["Service"])["Type"] == "oneshot"


def test_systemd_exec_start_is_a_shell_command_that_parses():
    exec_start = dict(unit_file(SERVICE)["Service"])["ExecStart"]
    argv = shlex.split(exec_start.replace("$$", "$").replace("%%", "%"))
    assert argv[:2] == ["/bin/sh", "-c"]
    subprocess.run(["sh", "-n", "-c", argv[2]], check=True)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_units_pass_systemd_analyze_verify():
    out = subprocess.run(["systemd-analyze", "verify", str(TIMER), str(SERVICE)], capture_output=True, text=True)
    problems = [
        line
        for line in (out.stdout + out.stderr).splitlines()
        if str(CLUSTER) in line or "Unknown" in line or "Failed" in line
    ]
    assert out.returncode == 0 and not problems, out.stdout + out.stderr
    calendar = dict(unit_file(TIMER)["Timer"])["OnCalendar"]
    subprocess.run(["systemd-analyze", "calendar", calendar], check=True, capture_output=True)


# -- entrypoints -----------------------------------------------------------------------

# `slmbatch run` then its arguments ("double-quoted" words included), up to a shell operator, a single
# quote (the end of an `sh -c '...'`) or a markdown backtick.
SLMBATCH_RUN = re.compile(r"(?<![\w-])slmbatch run((?:[ \t]+[^\s'`|;&><\\]+)*)")


def named_commands() -> list[tuple[str, tuple[str, ...]]]:
    """(file, argv after `slmbatch run`) for every `slmbatch run <job file>` under cluster/."""
    found = []
    for path in sorted(CLUSTER.rglob("*")):
        if path.is_file():
            for match in SLMBATCH_RUN.finditer(path.read_text()):
                args = match.group(1).split()
                positional = [a for a in args if not a.startswith("-")]
                if positional and positional[0].endswith(".py"):  # else prose ("slmbatch run of ...")
                    found.append((str(path.relative_to(ROOT)), args))
    return sorted({(f, tuple(a)) for f, a in found})


def test_every_config_names_a_slmbatch_run_command():
    files = {f for f, _ in named_commands()}
    for path in (LAUNCHER, RAYJOB, CRONJOB, CRONTAB, SERVICE, CLUSTER / "README.md"):
        assert str(path.relative_to(ROOT)) in files, f"{path.name} names no `slmbatch run <job file>`"


def test_the_slmbatch_console_script_and_its_run_subcommand_exist():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["slmbatch"] == "slmbatch.cli:main"
    installed = {
        e.name: e.value
        for e in importlib.metadata.distribution("slmbatch").entry_points
        if e.group == "console_scripts"
    }
    assert installed.get("slmbatch") == "slmbatch.cli:main", "reinstall: the installed console script differs"
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    assert "run" in subparsers.choices


@pytest.mark.parametrize("where, args", named_commands(), ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_every_named_job_file_exists_and_loads_with_the_arguments_given(where, args, monkeypatch):
    for name in [k for k in os.environ if k.startswith("SLMBATCH_")]:
        monkeypatch.delenv(name)
    parsed = build_parser().parse_args(["run", *args])  # exits (SystemExit) on an unknown option
    job_file = ROOT / parsed.job_file
    assert job_file.is_file(), f"{where} names {parsed.job_file}, which does not exist"
    load_job(str(job_file), parsed.job)


def config_envs() -> list[tuple[str, dict[str, str]]]:
    rayjob = yaml.safe_load(load(RAYJOB)["spec"]["runtimeEnvYAML"])["env_vars"]
    cron = {
        v["name"]: v["value"].replace("{date}", "2026-11-28")
        for v in cronjob_container()["env"]
        if v["name"].startswith("SLMBATCH_")
    }
    return [("rayjob", rayjob), ("cronjob", cron)]


@pytest.mark.parametrize("where, env", config_envs(), ids=lambda x: x if isinstance(x, str) else "")
def test_the_job_file_accepts_the_environment_the_manifests_give_it(where, env, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    job = load_job(str(ROOT / "jobs" / "support_intents.py"))
    model = job.stages[0].model
    assert model.num_gpus == float(env["SLMBATCH_NUM_GPUS"]) and model.replicas == int(env["SLMBATCH_REPLICAS"])
    assert job.source.path == env["SLMBATCH_INPUT"] and job.sink.path == env["SLMBATCH_OUTPUT"]
