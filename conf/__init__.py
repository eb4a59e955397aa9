"""The Hydra config tree, shipped as `ayt.conf`. Hydra imports this package before composing,
so the structured study schema is in its ConfigStore whenever `study=` is composed."""

import ayt.studies.engine.schema  # noqa: F401  (registers `study/schema`, which conf/study/base.yaml extends)
