"""`python -m ayt.studies.feature_map`: the search space is conf/study/feature_map.yaml (see studies/feature_map/)."""

import sys

from ayt.studies.engine.cli import study_main

if __name__ == "__main__":
    sys.exit(study_main("feature_map"))
