"""Run configuration: one YAML file with sections model / data / lora / train / tune, plus --set
overrides.

Every option has a default, a type and a docstring (the docstrings are what `lorafit train --help`
prints). Unknown sections or keys are errors with a did-you-mean suggestion.

    options.py  the sections' dataclasses, their defaults and docstrings
    checks.py   a raw dict -> a checked RunConfig (types, then the rules between options)
    files.py    the YAML file + --set overrides -> a raw dict -> a RunConfig
"""

from lorafit.train.config.checks import (
    build_run_config,
    relora_blocker,
    relora_options,
    suggest,
)
from lorafit.train.config.files import load_run_config, parse_override, read_raw_config
from lorafit.train.config.options import (
    METHODS,
    NO_VALIDATION_FILE,
    RUN_LORA_DEFAULTS,
    SCHEDULES,
    SECTIONS,
    DataOptions,
    ModelOptions,
    ReloraOptions,
    RunConfig,
    TrainOptions,
    TuneOptions,
    early_stopping_needs_validation,
    field_docs,
    one_of,
)

__all__ = [
    "METHODS",
    "NO_VALIDATION_FILE",
    "RUN_LORA_DEFAULTS",
    "SCHEDULES",
    "SECTIONS",
    "DataOptions",
    "ModelOptions",
    "ReloraOptions",
    "RunConfig",
    "TrainOptions",
    "TuneOptions",
    "build_run_config",
    "early_stopping_needs_validation",
    "field_docs",
    "load_run_config",
    "one_of",
    "parse_override",
    "read_raw_config",
    "relora_blocker",
    "relora_options",
    "suggest",
]
