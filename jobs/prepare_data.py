"""Job: read WFDB records + ECG-QA once into Parquet shards with Ray Data (ecgray prepare).

ray job submit --working-dir . -- python -m jobs.prepare_data --help
ray job submit --working-dir . -- python -m jobs.prepare_data --ptbxl P --ecgqa Q --out s3://<bucket>/prepared

The Ray workers write the ECG shards themselves: on a multi-node cluster, give --out as a URI (or a path on
a file system every node shares); the inputs are local paths every node sees.
"""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("ecgray.data.prepare", "jobs.prepare_data", __doc__.splitlines()[0]))
