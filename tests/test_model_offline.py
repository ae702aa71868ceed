"""Model resolution without a hub: fail at once (no client retries) with advice that fits what
was asked for (a hub id gets `hf download`, a path gets 'no such directory')."""

from __future__ import annotations

import logging
import time

import pytest

from pipeline.commands.exits import for_error
from pipeline.errors import ModelError
from pipeline.model_loading import load_model
from pipeline.settings import load_settings
from tests.test_pipeline_e2e import free_port


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    import huggingface_hub
    import torch  # noqa: F401  (imported here, so that only resolution is timed below)
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration  # noqa: F401

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))


def test_a_hub_model_offline_fails_at_once_with_the_download_advice(
    hub_offline: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    started = time.monotonic()
    with pytest.raises(ModelError) as caught:
        load_model(load_settings(model="skutag-test/not-a-model", device="cpu", quantization="fp32"))
    assert time.monotonic() - started < 10, "the hub client retried instead of failing"
    assert "the hub cannot be reached" in caught.value.message
    assert "`hf download skutag-test/not-a-model --local-dir ./models/not-a-model`" in caught.value.message
    assert not [record for record in caplog.records if "Retrying" in record.getMessage()]


@pytest.mark.parametrize("model", ["./no-such-dir", "../models/none", "/opt/models/none", "models/a/b"])
def test_a_missing_directory_is_named_as_one_and_never_sent_to_the_hub(hub_offline: None, model: str) -> None:
    with pytest.raises(ModelError) as caught:
        load_model(load_settings(model=model, device="cpu", quantization="fp32"))
    assert caught.value.message.startswith(f"SKUTAG_MODEL / --model {model!r}: no such directory")
    assert "hf download" not in caught.value.message
    assert for_error(caught.value) == 2
