"""What every stage uses and nothing of the method: errors, atomic files, locks, devices and threads,
progress, the dask cluster, the version. Nothing here imports torch at import time, except
device.py."""
