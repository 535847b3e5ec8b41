"""Hydra config tree for epserve (shipped as package data so installs can find it)."""
