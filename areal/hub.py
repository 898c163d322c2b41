"""Hub names (`Qwen/Qwen2.5-0.5B-Instruct`, `openai/gsm8k`) settled before a run starts.

transformers and datasets fetch a name that is not a local path from huggingface.co; when the hub
cannot be reached they retry for 25-50 s and end in a traceback. `check_hub_names` asks the hub once,
for a few seconds at most, and when it does not answer (or HF_HUB_OFFLINE=1 is set) the run goes on
from the local Hugging Face cache alone: HF_HUB_OFFLINE=1 is set for this process and every role it
starts, so nothing retries; a name the cache lacks is one error naming its key and how to point the
key at a local copy instead.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

from areal.config import ConfigError

log = logging.getLogger("areal")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PROBE_TIMEOUT_S = 5.0  # a host that does not answer costs this, once per run
_TRUE = {"1", "ON", "YES", "TRUE"}  # what huggingface_hub reads as true


def is_hub_name(path: str) -> bool:
    """`org/name` that is not a local path: transformers and datasets would look it up on the hub."""
    return bool(HUB_ID.match(path)) and not Path(path).exists()


def offline_by_env() -> bool:
    return any(os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def unreachable_reason(timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the hub cannot be reached, or None when it answers (any HTTP status is an answer)."""
    if offline_by_env():
        return "HF_HUB_OFFLINE=1"
    result: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint(), method="HEAD"), timeout=timeout_s).close()
            result.append(None)
        except urllib.error.HTTPError:
            result.append(None)
        except (OSError, ValueError) as e:  # URLError (DNS, refused, no route), a timeout, a bad HF_ENDPOINT
            result.append(str(getattr(e, "reason", e)))

    # a thread, because name resolution is not bounded by the socket timeout
    thread = threading.Thread(target=probe, daemon=True, name="hub-probe")
    thread.start()
    thread.join(timeout_s + 1.0)
    if not result:
        return f"no answer within {timeout_s:.0f} s"
    return None if result[0] is None else f"{endpoint()} cannot be reached: {result[0]}"


def go_offline() -> None:
    """Loaders read the cache only, now and in every role started from here (they inherit the environment)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    # modules imported before this read the variable at import
    if "huggingface_hub.constants" in sys.modules:
        sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True
    if "datasets.config" in sys.modules:
        sys.modules["datasets.config"].HF_HUB_OFFLINE = True


def model_in_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def dataset_in_cache(name: str) -> bool:
    """Either cache datasets reads offline: its own prepared copy, or the hub's file cache."""
    from datasets import config
    from huggingface_hub import constants

    return (Path(config.HF_DATASETS_CACHE) / name.replace("/", "___")).is_dir() or (
        Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}").is_dir()


def missing_message(key: str, name: str, reason: str, dataset: bool) -> str:
    kind, flag, target = ("dataset", " --repo-type dataset", "its .parquet/.jsonl file") if dataset else (
        "model", "", "DIR")
    return (f"{key}: '{name}' is not a local path and not in the local Hugging Face cache, and the hub cannot be "
            f"reached ({reason}); download the {kind} where the hub is reachable (hf download {name}{flag} "
            f"--local-dir DIR) and set {key} to {target}")


def check_hub_names(names: dict[str, tuple[str, bool]]) -> None:
    """`names`: key -> (path, is a dataset). Hub names only are looked at; with none, nothing is asked.
    Raises ConfigError naming the first key whose hub name can be neither fetched nor found in the cache."""
    hub = {key: (path, dataset) for key, (path, dataset) in names.items() if is_hub_name(path)}
    if not hub:
        return
    asked = not offline_by_env()
    reason = unreachable_reason()
    if reason is None:
        return
    go_offline()
    for key, (path, dataset) in hub.items():
        if not (dataset_in_cache(path) if dataset else model_in_cache(path)):
            raise ConfigError(missing_message(key, path, reason, dataset))
    if asked:
        log.warning("the Hugging Face hub cannot be reached (%s): %s from the local cache (HF_HUB_OFFLINE=1)",
                    reason, ", ".join(path for path, _ in hub.values()))
