"""Settings: defaults need no server; environment and flags override; bad values get one line."""

from __future__ import annotations

import pytest

from pipeline.errors import ConfigError
from pipeline.settings import load_settings


def test_defaults_need_no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SKUTAG_DATABASE_URL", "SKUTAG_MODEL", "SKUTAG_QUANTIZATION"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.database_url == "sqlite:///skutag.db"
    assert settings.model == "Qwen/Qwen3-VL-8B-Instruct"
    assert settings.quantization == "int8"
    assert settings.image_size == 384
    assert settings.quantization_skip_modules == ["model.visual", "lm_head"]


def test_environment_then_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKUTAG_BATCH_SIZE", "64")
    monkeypatch.setenv("SKUTAG_QUANTIZATION", "nf4")
    monkeypatch.setenv("SKUTAG_ATTRIBUTE_THRESHOLDS", '{"style": 0.7}')
    settings = load_settings(quantization="bf16", batch_size=None)
    assert (settings.batch_size, settings.quantization) == (64, "bf16")
    assert settings.threshold_for("style") == 0.7
    assert settings.threshold_for("pattern") == settings.confidence_threshold


@pytest.mark.parametrize(
    ("env", "value", "message"),
    [
        (
            "SKUTAG_QUANTIZATION",
            "int4",
            "SKUTAG_QUANTIZATION: Input should be 'int8', 'nf4', 'bf16', 'fp16' or 'fp32' (got 'int4')",
        ),
        ("SKUTAG_BATCH_SIZE", "0", "SKUTAG_BATCH_SIZE: Input should be greater than or equal to 1 (got '0')"),
        ("SKUTAG_IMAGE_SIZE", "400", "SKUTAG_IMAGE_SIZE: Value error, must be a multiple of 32 (got '400')"),
        ("SKUTAG_DEVICE", "tpu", "SKUTAG_DEVICE: String should match pattern"),
        (
            "SKUTAG_ATTRIBUTE_THRESHOLDS",
            '{"style": 2}',
            "SKUTAG_ATTRIBUTE_THRESHOLDS: Value error, threshold for 'style' must be within [0, 1]",
        ),
    ],
)
def test_a_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, env: str, value: str, message: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value).startswith("invalid settings: " + message)
    assert "\n" not in str(caught.value)
