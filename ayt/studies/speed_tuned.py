"""`python -m ayt.studies.speed_tuned`: the search space is conf/study/speed_tuned.yaml (see studies/speed_tuned/)."""

import sys

from ayt.studies.engine.cli import study_main

if __name__ == "__main__":
    sys.exit(study_main("speed_tuned"))
