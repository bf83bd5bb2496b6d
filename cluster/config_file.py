"""The TOML config file: one file for every role, one table each ([node], [coordinator],
[fleetctl]). Keys are setting names; a relative path resolves against the file's directory
and `~` expands. A settings class reads only its own table, through `TableSource`."""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsError

TABLES = ("node", "coordinator", "fleetctl")


class ConfigFileError(SettingsError):
    """The config file cannot be used; the message names the file and the key or line at fault."""


def read_config(path: Path) -> dict[str, dict[str, Any]]:
    """The file's tables by name; raises ConfigFileError (missing, unreadable, bad TOML, stray table)."""
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigFileError(f"config file {path}: not found") from None
    except OSError as exc:
        raise ConfigFileError(f"config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigFileError(f"config file {path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:  # its message ends "(at line L, column C)"
        raise ConfigFileError(f"config file {path}: not valid TOML: {exc}") from None
    expected = ", ".join(f"[{t}]" for t in TABLES)
    for name, table in doc.items():
        if not isinstance(table, dict):
            raise ConfigFileError(
                f"config file {path}: {name} is outside any table; settings go in {expected}"
            )
        if name not in TABLES:
            raise ConfigFileError(
                f"config file {path}: unknown table [{name}]; expected {expected}"
            )
    return doc


class TableSource(PydanticBaseSettingsSource):
    """One table of the file named by the `config_file` setting (given by a source above this
    one: flags or environment). Each value is checked against its field as it is read, so an
    error names the key, the file and the table, even when a flag overrides that key."""

    def __init__(self, settings_cls: type[BaseSettings], table: str):
        super().__init__(settings_cls)
        self.table = table

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads the whole table at once

    def __call__(self) -> dict[str, Any]:
        given = self.current_state.get("config_file")
        if given is None:
            return {}
        path = Path(given)
        where = f"(in {path} [{self.table}])"
        fields = {k: f for k, f in self.settings_cls.model_fields.items() if k != "config_file"}
        values = {}
        for key, raw in read_config(path).get(self.table, {}).items():
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise ConfigFileError(f"unknown setting {key} {where}{hint}")
            try:
                value = TypeAdapter(fields[key].rebuild_annotation()).validate_python(raw)
            except ValidationError as exc:
                first = exc.errors()[0]
                item = "".join(f"[{i}]" for i in first["loc"])
                raise ConfigFileError(
                    f"invalid setting {key}{item} {where}: {first['msg']}"
                ) from None
            if isinstance(value, Path):
                value = path.absolute().parent / value.expanduser()
            values[key] = value
        return values
