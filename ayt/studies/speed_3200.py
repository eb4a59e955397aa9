"""`python -m ayt.studies.speed_3200`: the search space is conf/study/speed_3200.yaml (its report, once run, goes to studies/speed_3200/)."""

import sys

from ayt.studies.engine.cli import study_main

if __name__ == "__main__":
    sys.exit(study_main("speed_3200"))
