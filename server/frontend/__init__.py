"""The front end's side of the engine (the gRPC process, the bench, the load tool, tests).

Module guide (one job per file):
  start.py          start_engine(AppConfig): the core in its own process or on a thread, an EngineClient on it
  client.py         EngineClient: the Engine every front end uses (requests, text, streams)
  core_link.py      the client's live connection: event loop in use, reader, failure, shutdown
  request_table.py  what the client awaits from the core: live requests, calls, frame confirmations
  pipes.py          the front end's end of the two ZeroMQ pipes (ipc:// or inproc://)
  liveness.py       the front end's judgement that the core still runs (heartbeat silence)
  input_batch.py    what one event-loop turn sends the core, as one InputFrame
  request_checks.py the invariants a request must meet before it is sent (validation is the rpc layer's)
  output.py         new token ids -> GenerationChunk per request (text, stop strings, usage)
  detokenizer.py    incremental text deltas (no broken UTF-8)
  stop_strings.py   stop strings, matched on the decoded text
  stream.py         chunks -> stream messages (merged; server.stream_interval)
"""
