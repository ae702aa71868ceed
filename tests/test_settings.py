"""Settings: defaults need no server; environment and flags override; bad values get one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.commands.exits import for_error
from pipeline.errors import ConfigError
from pipeline.settings import load_settings
from schemas.taxonomy import CATEGORY, default_taxonomy


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
            "SKUTAG_QUANTIZATION: Input should be 'int8', 'int8-torchao', 'nf4', 'bf16', 'fp16' or 'fp32' (got 'int4')",
        ),
        ("SKUTAG_BATCH_SIZE", "0", "SKUTAG_BATCH_SIZE: Input should be greater than or equal to 1 (got '0')"),
        ("SKUTAG_IMAGE_SIZE", "400", "SKUTAG_IMAGE_SIZE: must be a multiple of 32 (got '400')"),
        ("SKUTAG_DEVICE", "tpu", "SKUTAG_DEVICE: String should match pattern"),
        (
            "SKUTAG_MERGE_CONFLICT_CONFIDENCE",
            "1.5",
            "SKUTAG_MERGE_CONFLICT_CONFIDENCE: Input should be less than or equal to 1 (got '1.5')",
        ),
        (
            "SKUTAG_ATTRIBUTE_THRESHOLDS",
            '{"style": 2}',
            "SKUTAG_ATTRIBUTE_THRESHOLDS: threshold for 'style' must be within [0, 1]",
        ),
    ],
)
def test_a_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, env: str, value: str, message: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value).startswith("invalid settings: " + message)
    assert "\n" not in str(caught.value)


# --- list and mapping settings as people write them ----------------------------------------
@pytest.mark.parametrize(
    ("env", "value", "field", "expected"),
    [
        ("SKUTAG_IMAGE_ROOTS", "/data/images", "image_roots", [Path("/data/images")]),
        ("SKUTAG_IMAGE_ROOTS", f"/a{os.pathsep}/b, /c", "image_roots", [Path("/a"), Path("/b"), Path("/c")]),
        ("SKUTAG_IMAGE_ROOTS", '["/data/images"]', "image_roots", [Path("/data/images")]),
        ("SKUTAG_ALLOWED_HOSTS", "cdn.example.com", "allowed_hosts", ["cdn.example.com"]),
        ("SKUTAG_ALLOWED_HOSTS", "cdn.example.com, [::1]:8765", "allowed_hosts", ["cdn.example.com", "[::1]:8765"]),
        ("SKUTAG_ALLOWED_HOSTS", '["a.example", "b.example:8080"]', "allowed_hosts", ["a.example", "b.example:8080"]),
        ("SKUTAG_ALLOWED_HOSTS", "", "allowed_hosts", []),
        ("SKUTAG_IMAGE_FORMATS", "jpeg,png", "image_formats", ["JPEG", "PNG"]),
        ("SKUTAG_QUANTIZATION_SKIP_MODULES", "lm_head", "quantization_skip_modules", ["lm_head"]),
        (
            "SKUTAG_ATTRIBUTE_THRESHOLDS",
            "style=0.7, pattern=0.6",
            "attribute_thresholds",
            {"style": 0.7, "pattern": 0.6},
        ),
        ("SKUTAG_ATTRIBUTE_THRESHOLDS", '{"style": 0.7}', "attribute_thresholds", {"style": 0.7}),
        (
            "SKUTAG_DATABASE_URL",
            "postgres://u@db.example/tags",
            "database_url",
            "postgresql+psycopg2://u@db.example/tags",
        ),
        ("SKUTAG_DATABASE_URL", "postgresql://u@db/tags", "database_url", "postgresql+psycopg2://u@db/tags"),
    ],
)
def test_list_settings_take_a_plain_value_a_separated_list_or_json(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, field: str, expected: object
) -> None:
    monkeypatch.setenv(env, value)
    assert getattr(load_settings(), field) == expected


@pytest.mark.parametrize(
    ("env", "value", "message"),
    [
        ("SKUTAG_ATTRIBUTE_THRESHOLDS", "{style: 0.7}", "SKUTAG_ATTRIBUTE_THRESHOLDS: not JSON"),
        ("SKUTAG_ATTRIBUTE_THRESHOLDS", "style", "SKUTAG_ATTRIBUTE_THRESHOLDS: 'style' is not name=value"),
        ("SKUTAG_ATTRIBUTE_THRESHOLDS", "style=high", "SKUTAG_ATTRIBUTE_THRESHOLDS [style]: Input should be a valid"),
        ("SKUTAG_IMAGE_ROOTS", "[/data/images", "SKUTAG_IMAGE_ROOTS: not a JSON list"),
        ("SKUTAG_IMAGE_FORMATS", '["JPEG", 1]', "SKUTAG_IMAGE_FORMATS [1]: Input should be a valid string"),
        ("SKUTAG_IMAGE_FORMATS", "[1, 2", "SKUTAG_IMAGE_FORMATS: not a JSON list"),
    ],
)
def test_a_malformed_list_or_mapping_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, message: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value).startswith("invalid settings: " + message), str(caught.value)
    assert "\n" not in str(caught.value)
    assert for_error(caught.value) == 2


def test_a_misspelt_attribute_in_the_thresholds_is_refused_with_a_suggestion(monkeypatch: pytest.MonkeyPatch) -> None:
    taxonomy = default_taxonomy()
    names = [*taxonomy.attributes, CATEGORY]
    monkeypatch.setenv("SKUTAG_ATTRIBUTE_THRESHOLDS", "stlye=0.7")
    with pytest.raises(ConfigError, match=r"SKUTAG_ATTRIBUTE_THRESHOLDS: no attribute 'stlye'.*did you mean 'style'"):
        load_settings().check_thresholds(names)
    monkeypatch.setenv("SKUTAG_ATTRIBUTE_THRESHOLDS", "style=0.7,category=0.9")
    load_settings().check_thresholds(names)  # every name known: no error
