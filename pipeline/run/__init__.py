"""Running a recipe: ``runner`` runs stages in order (cached, resumable, under accelerate), ``context`` is what a
stage sees, ``manifest`` records each stage (hashes, lineage, outputs), ``lock`` keeps one run per directory,
``preflight`` checks models and data before anything heavy, ``export`` writes a finished model out. Stage kinds
are found through ``pipeline.config.registry``; nothing here imports a stage module."""
