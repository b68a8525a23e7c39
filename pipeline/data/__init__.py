"""Data: reading sources, adapting user formats to canonical records, templates. No torch here."""
