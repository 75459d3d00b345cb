"""Results computed once per workdir and reused: trained classifiers, the analytic variance's table.

``cached(directory, name, settings, compute)`` keeps DIR/<name>.msgpack (the payload, any pytree of
arrays) and DIR/<name>.json (the settings it was computed with and what ``compute`` reported); a
later call with equal settings reads them back, other settings compute (and overwrite) anew.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.serialization

from diffusion.images import write_atomically

__all__ = ["cached", "write_json"]


def write_json(path: str, record: Mapping[str, Any]) -> None:
    """``record`` as indented, key-sorted JSON, written atomically."""
    text = json.dumps(record, indent=2, sort_keys=True).encode()
    write_atomically(path, lambda file: file.write(text))


def cached(
    directory: str,
    name: str,
    settings: Mapping[str, Any],
    compute: Callable[[], tuple[Any, Mapping[str, Any]]],
) -> tuple[Any, dict[str, Any]]:
    """(payload, info): read from ``directory`` when computed with equal ``settings``, else
    ``compute() -> (payload, facts)`` and store both (info = facts + settings + seconds).

    Settings are compared as JSON values (tuples and lists are equal). ``directory`` is created if
    needed. The payload comes back as nested dicts of numpy arrays (flax.serialization.msgpack).
    """
    os.makedirs(directory, exist_ok=True)
    payload_path = os.path.join(directory, f"{name}.msgpack")
    info_path = os.path.join(directory, f"{name}.json")
    settings = json.loads(json.dumps(dict(settings)))
    if os.path.exists(payload_path) and os.path.exists(info_path):
        with open(info_path) as file:
            info = json.load(file)
        if info.get("settings") == settings:
            with open(payload_path, "rb") as file:
                return flax.serialization.msgpack_restore(file.read()), info
    start = time.perf_counter()
    payload, facts = compute()
    data = flax.serialization.to_bytes(payload)
    write_atomically(payload_path, lambda file: file.write(data))
    info = {**facts, "settings": settings, "seconds": time.perf_counter() - start}
    write_json(info_path, info)
    return flax.serialization.msgpack_restore(data), info
