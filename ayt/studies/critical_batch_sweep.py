"""`python -m ayt.studies.critical_batch_sweep`: the search space is conf/study/critical_batch_sweep.yaml."""

import sys

from ayt.studies.engine.cli import study_main

if __name__ == "__main__":
    sys.exit(study_main("critical_batch_sweep"))
