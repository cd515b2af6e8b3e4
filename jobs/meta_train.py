"""Job: meta-train the fusion module with Ray Train + DeepSpeed (ecgray train).

ray job submit --working-dir . -- python -m jobs.meta_train --help
"""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("ecgray.train.meta_train", "jobs.meta_train", __doc__.splitlines()[0]))
