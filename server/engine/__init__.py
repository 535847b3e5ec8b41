"""The engine's vocabulary, shared by every process: api.py (requests, chunks, model info, errors,
and the Engine protocol the gRPC layer serves).

The engine itself sits in packages named for the process each file runs in:
  server/frontend/  the front end's client of the core (text, streams, failures): start_engine
  server/core/      the engine-core process: CoreLoop driving EngineCore (scheduler, step plans)
  server/worker/    every EP rank: model runner, buffers, sampler, rank start-up
Layers depend one way: engine.api <- worker <- core <- frontend <- rpc.
"""
