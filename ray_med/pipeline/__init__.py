"""The end-to-end pipeline that ``make demo`` runs: a list of stages from the job registry, each cached.

:mod:`~ray_med.pipeline.config` is its config and outputs, :mod:`~ray_med.pipeline.stages`
the stages and how each hands its typed outputs to the next, :mod:`~ray_med.pipeline.cache`
the stage keys, :mod:`~ray_med.pipeline.run` the runner (a Ray edge only through the jobs it
runs), :mod:`~ray_med.pipeline.show` what each stage prints.
"""
