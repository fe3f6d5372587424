"""The pieces of scripts/bench: common helpers, the components it drives,
and B9's scale curves."""
