"""The OpenAI-compatible HTTP front end (server.http_port), beside gRPC in the same process.

Module guide:
  front_end.py     uvicorn on the gRPC server's event loop; start and stop with the server
  app.py           routes (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics), bearer token
  endpoints.py     one completion or chat call as a plain ASGI app: validate, admit, answer or stream SSE
  body.py          the body as one JSON object within server.max_message_bytes
  fields.py        typed reads of JSON fields (400 naming the field)
  request_map.py   OpenAI body -> the gRPC API's GenerateRequest (validated by server/rpc/validation.py)
  choices.py       n choices per prompt <-> engine requests (one with n, or one per choice for echo logprobs)
  unsupported.py   fields the engine cannot serve yet, refused with a 400 naming them
  chat_template.py messages -> prompt ids through the checkpoint's chat template
  generation.py    admission (shared ActiveCalls slots), chunks of several prompts, usage tallies
  responses.py     OpenAI response objects and server-sent-event chunks
  logprob_shapes.py log-probabilities in the completions (top-N dicts, echo) and chat shapes
  errors.py        OpenAI's error shape and the status of each engine error
"""
