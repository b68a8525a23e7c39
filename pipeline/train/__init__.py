"""Training, shared by every training kind: ``args`` maps a recipe's train settings onto TRL's ``*Config``,
``fit`` builds, resumes, runs and saves a trainer, ``callbacks`` report progress, ``batching`` forms batches
(length-grouped, packed), ``checkpoints`` picks the newest complete checkpoint to resume from."""
