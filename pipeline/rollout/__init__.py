"""Rollouts: sampling from a policy and judging what it says. ``generation`` samples n responses per prompt
(KV cache shared across the n), ``batches`` pads token batches, ``sampling`` turns prompts into scored
candidates, ``scoring`` holds the checkers and the reward-model scorer, ``selection`` picks best rows and pairs."""
