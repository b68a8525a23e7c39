"""What a person sees of a run besides the console: ``tracking`` (W&B, TensorBoard), ``report`` (report.md and
the results table, from each kind's key metrics, plots, tables and headline), ``plots``."""
