"""Names the fine-tuning settings may refer to before the modules that implement them are imported.

:func:`agents.actors.register_algorithm` adds to :data:`ALGORITHM_NAMES`, so ``FinetuneConfig(algo=...)`` can
check a name without importing the actors (which import the settings)."""

from __future__ import annotations

ALGORITHM_NAMES: set[str] = {"reinflow", "ppo", "fpo"}
