"""The vision suite: ≥ 6 real image classification tasks, a model zoo built here, merge
methods and baselines, metrics and its RESULTS.md section (registered as suite ``vision``;
``tvsplit evaluate vision`` and ``tvsplit demo`` run it through the generic suite flow).

Modules: ``suite`` (the registered ``VisionSuite``: pool, methods, presets; light),
``data`` (tasks and splits), ``model`` (ConvNeXt backbone, heads), ``training``, ``zoo``,
``evaluate`` (accuracy with each task's head),
``merging`` (task vectors of a zoo family, in-memory splits, shared-part alignment),
``report`` (table, verdict, chart, section). Importing this package imports nothing heavy.
"""
