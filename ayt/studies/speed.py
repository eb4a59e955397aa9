"""`python -m ayt.studies.speed`: the search space is conf/study/speed.yaml (see studies/speed/)."""

import sys

from ayt.studies.engine.cli import study_main

if __name__ == "__main__":
    sys.exit(study_main("speed"))
