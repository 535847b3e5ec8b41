"""The engine: scheduler, KV cache, sampler, stops, and the EP rank orchestration."""
