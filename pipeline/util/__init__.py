"""Layer 0: what every other layer may use (errors, atomic files, wording, console, network probes).
Imports nothing else of the package."""
