"""Training stages, rollouts, checkpoints and benchmarks' building blocks on top of ``flowpolicy``.

Importing the package registers the stage configs' schemas in Hydra's ConfigStore (agents.config_schema), so
that ``hydra.compose`` of ``configs/`` works from any entry point.
"""

from .config_schema import register as _register_config_schemas

_register_config_schemas()
