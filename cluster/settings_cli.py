"""A daemon's command-line flags, made from its settings model.

Each setting's help, default and constraints are written once, on its field in
cluster/config.py; this module turns the fields into typer options, so a flag, its
`STUDIOFLEET_*` environment variable and its TOML key can never disagree. Field metadata
(`json_schema_extra`, set with `cluster.config.setting`) may name a different flag
(`--model` for model_path), a metavar, a default's wording, or `cli=False` for a setting
kept to the config file and environment.
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

CONFIG_OPTION = "config"


def _meta(field: FieldInfo) -> dict[str, Any]:
    extra = field.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def flag_name(name: str, field: FieldInfo) -> str:
    """The flag a setting is given by: its own name with dashes unless the field names one."""
    return _meta(field).get("flag") or "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> Any:
    """The type a flag parses: Optional and Annotated stripped; tuples are repeated flags."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _base_type(typing.get_args(annotation)[0])
    if origin is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    if origin is tuple:
        return List[_base_type(typing.get_args(annotation)[0])]
    return annotation if annotation in (str, int, float, bool, Path) else str


def _default_text(field: FieldInfo) -> str:
    meta = _meta(field)
    if "default_text" in meta:
        return meta["default_text"]
    default = field.get_default(call_default_factory=True)
    if default is None or default == "" or default == () or field.is_required():
        return ""
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, Path):
        return f"./{default}" if not default.is_absolute() else str(default)
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default)


def help_text(field: FieldInfo) -> str:
    """The field's description with its default, as `--help` shows it."""
    text = (field.description or "").strip()
    default = _default_text(field)
    return f"{text} [default: {default}]" if default else text


def _in_order(settings_cls: type[BaseSettings]) -> list[str]:
    """The settings in help order: the class's own, then each section's as its bases list them."""
    names: list[str] = []
    for klass in settings_cls.__mro__:
        names += [
            n
            for n in vars(klass).get("__annotations__", {})
            if n in settings_cls.model_fields and n not in names
        ]
    return names


def options(settings_cls: type[BaseSettings]) -> dict[str, tuple[Any, Any]]:
    """Setting name -> (annotation, typer.Option) for every field with a flag."""
    out: dict[str, tuple[Any, Any]] = {}
    for name in _in_order(settings_cls):
        field = settings_cls.model_fields[name]
        meta = _meta(field)
        if name == "config_file" or meta.get("cli") is False:
            continue
        kind = meta.get("cli_type") or _base_type(field.annotation)
        flag = flag_name(name, field)
        if kind is bool:
            decls = [flag] if "/" in flag or meta.get("flag_only") else [f"{flag}/--no-{flag[2:]}"]
            opt = typer.Option(None, *decls, help=help_text(field))
            out[name] = (Optional[bool], opt)
        elif typing.get_origin(kind) is list:
            opt = typer.Option([], flag, metavar=meta.get("metavar"), help=help_text(field))
            out[name] = (kind, opt)
        else:
            opt = typer.Option(None, flag, metavar=meta.get("metavar"), help=help_text(field))
            out[name] = (Optional[kind], opt)
    return out


def settings_command(
    app: typer.Typer,
    settings_cls: type[BaseSettings],
    config_help: str,
    run: Callable[[Optional[Path], dict[str, Any]], None],
) -> None:
    """Register the daemon's one command on `app`: `--config` plus a flag per setting. `run`
    gets the config file and the flags given (setting name -> value; unset flags left out)."""
    opts = options(settings_cls)
    params = [
        inspect.Parameter(
            CONFIG_OPTION,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Optional[Path],
            default=typer.Option(None, "--config", envvar="STUDIOFLEET_CONFIG", help=config_help),
        )
    ]
    params += [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=ann, default=opt)
        for name, (ann, opt) in opts.items()
    ]

    def serve(**given: Any) -> None:
        config = given.pop(CONFIG_OPTION)
        flags = {}
        for name, value in given.items():
            if value is None or (isinstance(value, (list, tuple)) and not value):
                continue
            flags[name] = tuple(value) if isinstance(value, list) else value
        run(config, flags)

    serve.__signature__ = inspect.Signature(params)
    serve.__annotations__ = {p.name: p.annotation for p in params}
    serve.__doc__ = app.info.help
    app.command()(serve)
