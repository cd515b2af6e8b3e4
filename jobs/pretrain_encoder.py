"""Job: pretrain the built-in ECG encoder (ecgray pretrain-encoder).
Runs on a GPU when the Ray cluster has or can add one (`--run-on auto|gpu|cpu`, jobs/_placement.py).

ray job submit --working-dir . -- python -m jobs.pretrain_encoder --help
"""

import sys

from jobs._placement import main

if __name__ == "__main__":
    sys.exit(main("ecgray.train.pretrain_encoder", "jobs.pretrain_encoder", __doc__.splitlines()[0]))
