"""`python -m ayt.studies.speed_long`: the search space is conf/study/speed_long.yaml (its report, once run, goes to studies/speed_long/)."""

import sys

from ayt.studies.engine.cli import study_main

if __name__ == "__main__":
    sys.exit(study_main("speed_long"))
