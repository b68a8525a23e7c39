"""The built-in stage kinds, one module each (``sft``, ``reward``, ``bon``, ``dpo``, ``grpo``, ``eval``); each ends
with ``register(StageKind(...))`` (see ``pipeline.config.registry``), which is how the rest of the pipeline learns
about it. ``keep_checks`` holds the input-share warnings and empty-input errors the kinds share.
"""
