"""Job: meta-test a checkpoint on unseen classes against the baselines (ecgray eval).

ray job submit --working-dir . -- python -m jobs.evaluate --help
"""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("ecgray.eval.cli", "jobs.evaluate", __doc__.splitlines()[0]))
