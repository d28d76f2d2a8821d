"""Search spaces and the validated YAML experiment format."""

from spaces.config import ConfigError, ExperimentConfig, Parameter, default_config_dict, load_config

__all__ = ["ConfigError", "ExperimentConfig", "Parameter", "default_config_dict", "load_config"]
