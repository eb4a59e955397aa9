"""`python -m ayt.studies.batch_size_sweep`: the search space is conf/study/batch_size_sweep.yaml."""

import sys

from ayt.studies.engine.cli import study_main

if __name__ == "__main__":
    sys.exit(study_main("batch_size_sweep"))
