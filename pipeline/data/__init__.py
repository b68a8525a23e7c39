"""Data: reading sources, adapting user formats to canonical records, mixtures, linters. No torch here."""
