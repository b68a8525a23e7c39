"""One small module per stage kind; each exposes ``run(ctx) -> metrics``."""
