"""Generated from proto/epserve/v1/*.proto by proto/generate.py. Do not edit."""
