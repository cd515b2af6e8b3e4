"""Job: meta-test a checkpoint on unseen classes against the baselines (ecgray eval).
Runs on a GPU when the Ray cluster has or can add one (`--run-on auto|gpu|cpu`, jobs/_placement.py).

ray job submit --working-dir . -- python -m jobs.evaluate --help
"""

import sys

from jobs._placement import main

if __name__ == "__main__":
    sys.exit(main("ecgray.eval.cli", "jobs.evaluate", __doc__.splitlines()[0]))
