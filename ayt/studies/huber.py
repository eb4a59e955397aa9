"""`python -m ayt.studies.huber`: the search space is conf/study/huber.yaml (see studies/huber/)."""

import sys

from ayt.studies.engine.cli import study_main

if __name__ == "__main__":
    sys.exit(study_main("huber"))
