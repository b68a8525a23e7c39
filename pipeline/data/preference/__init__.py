"""Preference data for reward models and DPO: formats.py reads each row shape into canonical pairs,
lint.py checks the pairs, prepare.py assembles the train / eval records a stage trains on."""
