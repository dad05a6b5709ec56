"""A run config read from its YAML file with `--set section.key=value` overrides applied."""

from __future__ import annotations

from typing import Any

from lorafit.train.config.checks import build_run_config
from lorafit.train.config.options import SECTIONS, RunConfig


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=1e-4' -> (['train', 'lr'], 0.0001); values are parsed as YAML."""
    import yaml

    if "=" not in text:
        raise ValueError(f"--set expects section.key=value, got {text!r}")
    key, _, value = text.partition("=")
    parts = key.strip().split(".")
    if len(parts) != 2:
        raise ValueError(f"--set key must look like section.key (e.g. train.lr), got {key!r}")
    if not value.strip():
        return parts, None
    try:
        return parts, yaml.safe_load(value)
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())
        raise ValueError(f"--set {text}: not valid YAML ({reason})") from None


def load_run_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config (or start from defaults when path is None) and apply --set overrides."""
    raw, source = read_raw_config(path, overrides)
    return build_run_config(raw, source)


def read_raw_config(path: str | None, overrides: list[str] = ()) -> tuple[dict[str, Any], str]:
    """(the YAML config as a nested dict with the --set overrides applied, its name for
    messages), not yet checked (build_run_config checks it)."""
    import yaml

    raw: dict[str, Any] = {}
    source = "defaults"
    if path:
        source = str(path)
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {path} does not exist") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(
            f"{source}: the top level must be a mapping with sections {sorted(SECTIONS)}"
        )
    for text in overrides:
        (section, key), value = parse_override(text)
        if raw.get(section) is None:  # absent, or written with no body (`lora:`)
            raw[section] = {}
        if not isinstance(raw[section], dict):
            raise ValueError(f"{source}: section {section!r} must be a mapping")
        raw[section][key] = value
    return raw, source
