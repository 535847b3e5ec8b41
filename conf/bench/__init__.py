"""Hydra config of epserve-bench (server/bench/cli.py); groups come from the parent conf/."""
