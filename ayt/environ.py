"""Process environment variables set for one block: a local Ray's address for the raylet it
starts (ayt.training.ray_train), a rehearsal's settings while its study is planned
(ayt.cluster.rehearse)."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Mapping


@contextlib.contextmanager
def environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set `values` for the block, then restore each variable as it was (or unset it)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
