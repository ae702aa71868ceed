"""deploy/: what can be checked without a Docker daemon. The Dockerfiles pass hadolint; the
compose file validates against the Compose Specification's schema (vendored, no network) and its
services, images, ports and files agree with each other, with Prometheus's scrape targets and
with skutag's commands; the systemd units pass `systemd-analyze verify`; the cron recipe and
the units read the one env file the workers read, and that file is valid skutag settings.
Not run here (no Docker daemon, no GPU): building the images, starting the stack."""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pipeline.cli import main
from pipeline.settings import ENV_PREFIX, Settings, load_settings

DEPLOY = Path(__file__).parents[1] / "deploy"
SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
DOCKERFILES = sorted(DEPLOY.glob("*.Dockerfile"))
UNITS = sorted((DEPLOY / "systemd").iterdir())
ENV_FILE = "/etc/skutag/skutag.env"
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "compose.yaml").read_text()))


def skutag_command_exists(args: list[str]) -> bool:
    """Whether `skutag ARGS...` names a real (sub)command."""
    command: Any = main
    for word in args:
        if word.startswith("-") or not hasattr(command, "commands"):
            break
        if word not in command.commands:
            return False
        command = command.commands[word]
    return True


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfiles_lint_clean(dockerfile: Path) -> None:
    result = subprocess.run([HADOLINT, "--no-color", str(dockerfile)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_images_run_as_a_numeric_non_root_user_with_a_health_check(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1].split(":")[0] not in {"0", "root"} and users[-1].split(":")[0].isdigit()
    assert re.search(r"^HEALTHCHECK ", text, re.M)
    assert re.search(r'^ENTRYPOINT \["skutag"\]$', text, re.M)
    assert "torch==2.13.0" in text  # never a bare torch


def test_the_worker_image_is_cuda_with_the_model_on_a_volume() -> None:
    text = (DEPLOY / "worker.Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:[\d.]+-\S*runtime\S*$", text, re.M)
    assert 'VOLUME ["/models"]' in text and "SKUTAG_MODEL=/models/" in text


def test_compose_validates_against_the_compose_spec() -> None:
    schema = json.loads(SCHEMA.read_text())  # draft 2019-09, by its $schema (spelled the old way)
    jsonschema.Draft201909Validator.check_schema(schema)
    jsonschema.Draft201909Validator(schema).validate(compose())


def test_compose_has_every_piece_and_they_fit_together() -> None:
    document = compose()
    services = document["services"]
    assert {"postgres", "redis", "worker", "writer", "review", "prometheus", "grafana"} <= set(services)
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on a missing service {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists() or source in {"./images", "./models"}, f"{name}: {source}"
            else:
                assert source in document["volumes"], f"{name} mounts an undeclared volume {source}"
        build = service.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
        if service.get("image", "").startswith("skutag"):
            args = service.get("entrypoint", ["skutag"])[1:] + service.get("command", [])
            assert skutag_command_exists(args), f"{name}: skutag {' '.join(args)} is not a command"


def settings_from_environment(variables: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings as a process started with exactly these SKUTAG_* variables reads them."""
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert set(variables) <= fields, f"not skutag settings: {sorted(set(variables) - fields)}"
    for name in [name for name in os.environ if name.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def test_compose_settings_are_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from_environment(compose()["x-skutag"]["environment"], monkeypatch)
    assert settings.image_roots == [Path("/data")] and settings.broker_url == "redis://redis:6379/0"


def test_prometheus_scrapes_what_compose_serves() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    services = compose()["services"]
    port = compose()["x-skutag"]["environment"]["SKUTAG_METRICS_PORT"]
    targets = {t for job in config["scrape_configs"] for group in job["static_configs"] for t in group["targets"]}
    assert {"worker:" + port, "writer:" + port, "pushgateway:9091"} == targets
    assert all(target.split(":")[0] in services for target in targets)


def test_grafana_is_provisioned_with_the_dashboard() -> None:
    grafana = compose()["services"]["grafana"]
    mounted = {volume.split(":")[1]: volume.split(":")[0] for volume in grafana["volumes"]}
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "skutag.yml").read_text())
    folder = provider["providers"][0]["options"]["path"]
    dashboard_source = mounted[f"{folder}/skutag.json"]
    assert (DEPLOY / dashboard_source).is_file()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_units_verify(tmp_path: Path) -> None:
    # Point ExecStart at this checkout's skutag: verify checks that the program exists.
    skutag = Path(sys.executable).with_name("skutag")
    for unit in UNITS:
        (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/skutag/bin/skutag", str(skutag)))
    names = [f"./{unit.name.replace('@.', '@0.')}" for unit in UNITS]
    result = subprocess.run(
        ["systemd-analyze", "verify", *names], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_units_and_cron_run_real_commands_with_the_workers_env_file() -> None:
    for unit in UNITS:
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.read_string(unit.read_text())
        if "Service" not in parser:
            continue  # the timer
        service = parser["Service"]
        assert service["User"] == "skutag" and service["EnvironmentFile"] == ENV_FILE, unit.name
        args = shlex.split(service["ExecStart"])
        assert skutag_command_exists(args[1:]), f"{unit.name}: {service['ExecStart']}"
    cron = [line for line in (DEPLOY / "cron" / "skutag-backfill").read_text().splitlines() if re.match(r"^\d", line)]
    assert len(cron) == 1
    fields = cron[0].split(maxsplit=6)
    assert fields[5] == "skutag" and f"set -a && . {ENV_FILE} && set +a" in fields[6]
    command = fields[6].split("&& /opt/skutag/bin/skutag ", 1)[1]
    assert skutag_command_exists(shlex.split(command))


def test_the_env_file_example_is_valid_settings_as_a_shell_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """cron and the docs source it with `set -a; . FILE`: quoting must leave valid JSON lists."""
    shell = subprocess.run(
        ["bash", "-c", f"set -a && . {DEPLOY / 'skutag.env.example'} && env -0"],
        capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    variables = dict(item.split("=", 1) for item in shell.stdout.split("\0") if item.startswith(ENV_PREFIX))
    settings = settings_from_environment(variables, monkeypatch)
    assert settings.image_roots == [Path("/data/images")]
    assert {"SKUTAG_MODEL", "SKUTAG_QUANTIZATION", "SKUTAG_DATABASE_URL", "SKUTAG_BROKER_URL"} <= set(variables)


def test_the_schema_check_is_not_vacuous() -> None:
    schema = json.loads(SCHEMA.read_text())
    broken = compose()
    broken["services"]["worker"]["gpus_please"] = True  # not a compose key
    with pytest.raises(jsonschema.ValidationError, match="gpus_please"):
        jsonschema.Draft201909Validator(schema).validate(broken)
