"""`python -m ayt.studies.huber_sweep`: the search space is conf/study/huber_sweep.yaml."""

import sys

from ayt.studies.engine.cli import study_main

if __name__ == "__main__":
    sys.exit(study_main("huber_sweep"))
