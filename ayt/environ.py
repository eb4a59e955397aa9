"""Process environment variables set for one block: a local Ray's address for the raylet it
starts (ayt.training.ray_train), a rehearsal's settings while its study is planned
(ayt.cluster.rehearse), the driver's values while a trial on another node resolves its config
(ayt.studies.engine.plan)."""

from __future__ import annotations

import contextlib
import os
import re
from typing import Iterator, Mapping

ENV_INTERPOLATION = re.compile(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)")


@contextlib.contextmanager
def environ(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set `values` for the block (None: unset), then restore each variable as it was."""
    saved = {k: os.environ.get(k) for k in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def env_read_by(config_text: str) -> dict[str, str | None]:
    """This process's value (None: unset) of every variable a config's `${oc.env:NAME}` reads."""
    return {name: os.environ.get(name) for name in sorted(set(ENV_INTERPOLATION.findall(config_text)))}
