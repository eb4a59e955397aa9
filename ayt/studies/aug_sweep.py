"""`python -m ayt.studies.aug_sweep`: the search space is conf/study/aug_sweep.yaml."""

import sys

from ayt.studies.engine.cli import study_main

if __name__ == "__main__":
    sys.exit(study_main("aug_sweep"))
