"""Loading the model once per worker process (never at import): device, dtypes, quantization
(bitsandbytes int8 / nf4, or half precision), the tokenizer and the image processor's numbers.
Load errors become one clear ModelError here: the boundary for torch / transformers / hub errors
at load time."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ModelError
from pipeline.settings import Settings


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    device: Any
    dtype: Any
    model_id: str
    revision: str | None
    quantization: str
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    patch_size: int
    merge_size: int
    temporal_patch_size: int


def resolve_device(setting: str) -> Any:
    import torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"SKUTAG_DEVICE is {setting!r} but no CUDA device is available")
    return device


def _dtypes(quantization: str, device: Any) -> tuple[Any, Any]:
    """(weights dtype, compute dtype) for a quantization on a device."""
    import torch

    if quantization == "fp32" or (device.type == "cpu" and quantization in {"int8", "nf4", "int8-torchao"}):
        return torch.float32, torch.float32
    half = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    named = {"bf16": torch.bfloat16, "fp16": torch.float16}
    return named.get(quantization, half), named.get(quantization, half)


def quantization_config(quantization: str, skip_modules: list[str], compute_dtype: Any) -> Any:
    from transformers import BitsAndBytesConfig

    if quantization == "int8-torchao":
        return torchao_int8_config(skip_modules)
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=skip_modules,
        )
    return None


def torchao_int8_config(skip_modules: list[str]) -> Any:
    """torchao's int8 weight-only: int8 weights dequantized inside the matmul kernel, the activations
    in bf16. Unlike LLM.int8 there is no outlier decomposition on every matmul, which is what makes
    bitsandbytes' int8 slower than bf16 per token; the memory saving is the same (about 9 GB)."""
    from transformers import TorchAoConfig

    try:
        from torchao.quantization import Int8WeightOnlyConfig
    except ImportError as exc:
        raise ModelError("quantization int8-torchao needs the torchao package: pip install torchao") from exc
    return TorchAoConfig(quant_type=Int8WeightOnlyConfig(), modules_to_not_convert=list(skip_modules))


def load_model(settings: Settings) -> LoadedModel:
    """Load the model and tokenizer once; errors become one clear ModelError."""
    device = resolve_device(settings.device)
    weights_dtype, compute_dtype = _dtypes(settings.quantization, device)
    _quiet_libraries()
    try:
        return _load(settings, device, weights_dtype, compute_dtype)
    except ModelError:
        raise
    except OSError as exc:
        raise ModelError(_missing_model_message(settings.model, exc)) from exc
    except (ImportError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load {settings.model} ({settings.quantization}): {first}") from exc


def _quiet_libraries() -> None:
    """Keep a worker's log to what an operator needs: no progress bars, no optional-kernel notices."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # bitsandbytes says so on every int8 matmul with fp32 inputs (the CPU path): expected, not news.
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast", category=UserWarning)


def _missing_model_message(model: str, exc: OSError) -> str:
    folder = model.rsplit("/", maxsplit=1)[-1]
    if Path(model).exists():
        return f"{model}: not a loadable model directory ({str(exc).splitlines()[0]})"
    if not _is_hub_id(model):
        return _no_such_directory(model)
    return (
        f"model {model!r} is not on this machine and the hub cannot be reached. On a machine with internet: "
        f"`hf download {model} --local-dir ./models/{folder}`, copy that folder here and set "
        f"SKUTAG_MODEL=./models/{folder} (or `skutag model tiny DIR` for a random test model)"
    )


def _load(settings: Settings, device: Any, weights_dtype: Any, compute_dtype: Any) -> LoadedModel:
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    directory = Path(settings.model)
    if directory.is_dir() and not (directory / "config.json").exists():
        raise ModelError(f"{settings.model}: not a loadable model directory (no config.json)")
    if not directory.exists() and not _is_hub_id(settings.model):
        raise ModelError(_no_such_directory(settings.model))
    kwargs: dict[str, Any] = {
        "revision": settings.model_revision,
        "attn_implementation": "sdpa",
        "dtype": weights_dtype,
    }
    config = quantization_config(settings.quantization, settings.quantization_skip_modules, compute_dtype)
    if config is not None:
        kwargs["quantization_config"] = config
        kwargs["device_map"] = {"": device}
    tokenizer = _local_first(AutoTokenizer.from_pretrained, settings.model, revision=settings.model_revision)
    model = _local_first(Qwen3VLForConditionalGeneration.from_pretrained, settings.model, **kwargs)
    if config is None:
        model = model.to(device)
    model.eval()
    processor = _image_processor_config(settings.model, settings.model_revision)
    vision = model.config.vision_config
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=compute_dtype,
        model_id=settings.model,
        revision=settings.model_revision,
        quantization=settings.quantization,
        image_mean=tuple(processor.get("image_mean", (0.5, 0.5, 0.5))),
        image_std=tuple(processor.get("image_std", (0.5, 0.5, 0.5))),
        patch_size=int(processor.get("patch_size", vision.patch_size)),
        merge_size=int(processor.get("merge_size", vision.spatial_merge_size)),
        temporal_patch_size=int(processor.get("temporal_patch_size", vision.temporal_patch_size)),
    )


def _local_first(loader: Callable[..., Any], model: str, **kwargs: Any) -> Any:
    """Load from the local cache without touching the network; go to the hub only for what is missing
    (a worker restarting with cached weights must not wait on the hub's retries)."""
    import huggingface_hub

    try:
        return loader(model, local_files_only=True, **kwargs)
    except OSError:
        if huggingface_hub.constants.HF_HUB_OFFLINE or Path(model).exists():
            raise
    _require_hub(huggingface_hub.constants.ENDPOINT)
    return loader(model, **kwargs)


def _require_hub(endpoint: str, timeout_s: float = 5.0) -> None:
    """One quick look at the hub before asking it for files: offline, the hub client would retry
    every request with back-off (22 log lines over a minute) before failing the same way."""
    import httpx

    try:
        httpx.head(endpoint, timeout=timeout_s)  # any answer, even an error status, means reachable
    except httpx.HTTPError as exc:
        raise OSError(f"{endpoint} cannot be reached: {exc}") from exc


def _is_hub_id(model: str) -> bool:
    """'Qwen/Qwen3-VL-8B-Instruct' or 'gpt2'; './models/x', '/opt/x' and 'a/b/c' are paths."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


def _no_such_directory(model: str) -> str:
    return (
        f"SKUTAG_MODEL / --model {model!r}: no such directory (a hub id looks like Qwen/Qwen3-VL-8B-Instruct; "
        "`skutag model tiny DIR` builds a random test model)"
    )


def _image_processor_config(model: str, revision: str | None) -> dict[str, Any]:
    from transformers.utils import cached_file

    path = cached_file(
        model, "preprocessor_config.json", revision=revision, _raise_exceptions_for_missing_entries=False
    )
    if path is None:
        return {}
    return dict(json.loads(Path(path).read_text()))
