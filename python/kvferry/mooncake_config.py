"""mooncake.json (`MOONCAKE_CONFIG_PATH`): the file Mooncake users point the
connectors and the store at.

Keys: `local_hostname`, `metadata_server`, `protocol`, `device_name`,
`master_server_address`, `global_segment_size` and `local_buffer_size`
(bytes as an int, or a string such as "1GB", "512MB", "4096").
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 1 << 10,
    "K": 1 << 10,
    "KIB": 1 << 10,
    "MB": 1 << 20,
    "M": 1 << 20,
    "MIB": 1 << 20,
    "GB": 1 << 30,
    "G": 1 << 30,
    "GIB": 1 << 30,
    "TB": 1 << 40,
    "T": 1 << 40,
    "TIB": 1 << 40,
}


def parse_size(value: Any, what: str = "size") -> int:
    """Bytes from an int or a string like "1GB", "512 MB", "3.5GiB", "4096".
    Units are binary (1 KB = 1024 bytes), as in Mooncake."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: {value!r} is not a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{what}: {value} is negative")
        return value
    if isinstance(value, float) and value >= 0 and value.is_integer():
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"{what}: {value!r} is not a size")
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f'{what}: {value!r} is not a size such as "1GB", "512MB" or 4096')
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass(frozen=True)
class MooncakeConfig:
    local_hostname: str | None = None
    metadata_server: str | None = None
    protocol: str | None = None
    device_name: str | None = None
    master_server_address: str | None = None
    global_segment_size: int | None = None
    local_buffer_size: int | None = None
    path: str | None = None

    @classmethod
    def from_dict(cls, data: dict, path: str | None = None) -> "MooncakeConfig":
        """The settings of a parsed mooncake.json; `ValueError` names a bad key."""
        if not isinstance(data, dict):
            raise ValueError(f"{path or 'mooncake config'}: expected a JSON object")
        where = path or "mooncake config"

        def text(key: str) -> str | None:
            v = data.get(key)
            if v is None:
                return None
            if not isinstance(v, str):
                raise ValueError(f"{where}: {key} must be a string, got {v!r}")
            return v

        def size(key: str) -> int | None:
            v = data.get(key)
            return None if v is None else parse_size(v, f"{where}: {key}")

        return cls(
            local_hostname=text("local_hostname"),
            metadata_server=text("metadata_server"),
            protocol=text("protocol"),
            device_name=text("device_name"),
            master_server_address=text("master_server_address"),
            global_segment_size=size("global_segment_size"),
            local_buffer_size=size("local_buffer_size"),
            path=path,
        )

    @classmethod
    def load(cls, path: str) -> "MooncakeConfig":
        """Reads and parses the mooncake.json at `path` (`ValueError` if it
        cannot be read or is invalid)."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as e:
            raise ValueError(f"cannot read the Mooncake config {path}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"the Mooncake config {path} is not valid JSON: {e}") from None
        return cls.from_dict(data, path)

    @classmethod
    def from_env(cls) -> "MooncakeConfig | None":
        """The file `MOONCAKE_CONFIG_PATH` names, or None when it is unset."""
        path = os.environ.get("MOONCAKE_CONFIG_PATH", "").strip()
        return cls.load(path) if path else None
