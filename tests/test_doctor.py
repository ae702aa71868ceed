"""`skutag doctor`: one line per check, against real services, the exit code by the worst."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

import pipeline.doctor
from pipeline.cli import main

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

CHECKS = ["settings", "database", "broker", "model", "gpu", "images", "disk"]


def doctor(env: dict[str, str], *args: str) -> tuple[Result, dict[str, str]]:
    result = CliRunner().invoke(main, ["doctor", *args], env=env)
    lines = result.output.strip().splitlines()
    levels = {}
    for line in lines:
        match = re.match(r"^(ok|warn|fail)\s+(\w+)\s+\S", line)
        assert match, f"not a check line: {line!r}"
        levels[match[2]] = match[1]
    return result, levels


@pytest.fixture
def healthy(migrated_postgres_url: str, redis_url: str, tiny_model_dir: Path, tmp_path: Path) -> dict[str, str]:
    return {
        "SKUTAG_DATABASE_URL": migrated_postgres_url,
        "SKUTAG_BROKER_URL": redis_url,
        "SKUTAG_MODEL": str(tiny_model_dir),
        "SKUTAG_QUANTIZATION": "fp32",
        "SKUTAG_DEVICE": "cpu",
        "SKUTAG_IMAGE_ROOTS": f'["{tmp_path}"]',
        "SKUTAG_WORK_DIR": str(tmp_path / "work"),
    }


@pytest.fixture(autouse=True)
def small_disk_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    # The disk check's own thresholds are tested below; a small CI disk must not fail the others.
    monkeypatch.setattr(pipeline.doctor, "LOW_DISK_WARN", 1)
    monkeypatch.setattr(pipeline.doctor, "LOW_DISK_FAIL", 1)


def test_a_ready_machine_passes_every_check(healthy: dict[str, str]) -> None:
    result, levels = doctor(healthy)
    assert list(levels) == CHECKS
    assert set(levels.values()) == {"ok"}, result.output
    assert result.exit_code == 0
    assert "qwen3_vl config loads" in result.output and "reachable (redis)" in result.output


@pytest.mark.parametrize(
    ("change", "check", "says"),
    [
        ({"SKUTAG_BROKER_URL": "redis://127.0.0.1:1/0"}, "broker", "unreachable"),
        ({"SKUTAG_DATABASE_URL": "postgresql+psycopg2://postgres@127.0.0.1:1/x"}, "database", "Connection refused"),
        ({"SKUTAG_MODEL": "/nonexistent/model"}, "model", "no such directory"),
        ({"SKUTAG_IMAGE_ROOTS": '["/nonexistent/images"]'}, "images", "not a directory"),
        ({"SKUTAG_DEVICE": "cuda:0"}, "gpu", "no CUDA GPU visible"),
    ],
)
def test_each_failure_is_its_own_line_and_exit_2(
    healthy: dict[str, str], change: dict[str, str], check: str, says: str
) -> None:
    if check == "gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result, levels = doctor(healthy | change)
    assert levels[check] == "fail", result.output
    assert {name for name, level in levels.items() if level != "ok"} == {check}, result.output
    assert says in result.output and result.exit_code == 2
    assert "Traceback" not in result.output


def test_an_unmigrated_database_says_what_to_run(healthy: dict[str, str], empty_postgres_url: str) -> None:
    result, levels = doctor(healthy | {"SKUTAG_DATABASE_URL": empty_postgres_url})
    assert levels["database"] == "fail" and "run `skutag db upgrade`" in result.output


def test_a_model_directory_without_weights(healthy: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "half-model").mkdir()
    (tmp_path / "half-model" / "config.json").write_text("{}")
    result, levels = doctor(healthy | {"SKUTAG_MODEL": str(tmp_path / "half-model")})
    assert levels["model"] == "fail" and "no *.safetensors weights" in result.output


def test_bad_settings_stop_the_checks(healthy: dict[str, str]) -> None:
    result, levels = doctor(healthy | {"SKUTAG_BATCH_SIZE": "0"})
    assert list(levels) == ["settings"] and levels["settings"] == "fail"
    assert "SKUTAG_BATCH_SIZE" in result.output and result.exit_code == 2


def test_warnings_alone_exit_1(healthy: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline.doctor, "LOW_DISK_WARN", 1 << 62)  # more free space than any disk has
    result, levels = doctor(healthy)
    assert levels["disk"] == "warn" and result.exit_code == 1, result.output


def test_a_full_disk_fails(healthy: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline.doctor, "LOW_DISK_FAIL", 1 << 62)
    result, levels = doctor(healthy)
    assert levels["disk"] == "fail" and result.exit_code == 2, result.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_bitsandbytes_kernels_are_checked(healthy: dict[str, str]) -> None:
    result, levels = doctor(healthy | {"SKUTAG_DEVICE": "cuda", "SKUTAG_QUANTIZATION": "int8"})
    assert levels["gpu"] == "ok" and "bitsandbytes CUDA kernels work (int8)" in result.output, result.output


@pytest.mark.rabbitmq
def test_the_broker_check_speaks_amqp_too(healthy: dict[str, str], rabbitmq_url: str) -> None:
    result, levels = doctor(healthy | {"SKUTAG_BROKER_URL": rabbitmq_url})
    assert levels["broker"] == "ok" and "reachable (py-amqp)" in result.output, result.output
    result, levels = doctor(healthy | {"SKUTAG_BROKER_URL": "amqp://guest:guest@127.0.0.1:1//"})
    assert levels["broker"] == "fail" and "unreachable" in result.output
