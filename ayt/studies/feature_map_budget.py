"""`python -m ayt.studies.feature_map_budget`: the search space is conf/study/feature_map_budget.yaml (see studies/feature_map_budget/)."""

import sys

from ayt.studies.engine.cli import study_main

if __name__ == "__main__":
    sys.exit(study_main("feature_map_budget"))
