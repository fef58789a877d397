"""LoRA sweeps on Ray Tune: search spaces as config-path data, the trial table, the Tune driver.

``config`` (the sweep's config), ``space`` (search spaces, strict trial configs) and
``report`` (trials.csv, the table, the plots, the best trial) are plain Python;
``sweep`` is the Ray edge (``jobs/sweep.py``: Tune over Ray Train V2).
"""
