"""The run configuration: a typed schema with defaults, read from YAML plus dotted overrides.

    cfg = load_config("configs/convnext_t.yaml", ["optim.lr=1e-3", "data.batch_size=64"])
    cfg.optim.lr  # 0.001

Every key is declared with its type and default (core.config_schema), so a typo or a wrong type is caught
before anything runs, with a one-line message that names the key and the way out. The rules beyond types live in
core.config_validation, reading and writing in core.config_loading; the project imports their names from here.
"""
from core.config_loading import all_keys, config_from_dict, load_config, parse_override, save_config, to_dict
from core.config_schema import (AugCfg, CheckpointCfg, Config, DataCfg, DistCfg, EmaCfg, LogCfg, ModelCfg, OptimCfg,
                                ScheduleCfg, TrainCfg)
from core.config_validation import CHOICES, NON_NEGATIVE, POSITIVE, UNIT_INTERVAL, get, validate
from core.errors import ConfigError

__all__ = ["Config", "ConfigError", "load_config", "save_config", "config_from_dict", "to_dict", "all_keys",
           "parse_override", "get", "ModelCfg", "DataCfg", "AugCfg", "OptimCfg", "ScheduleCfg", "EmaCfg", "TrainCfg",
           "CheckpointCfg", "DistCfg", "LogCfg", "CHOICES", "POSITIVE", "NON_NEGATIVE", "UNIT_INTERVAL", "validate"]
