"""The gRPC front end: service, request validation, auth, health, metrics and shutdown.

Module guide:
  received.py     raw bytes -> GenerateRequest, noticing what protobuf would hide (both prompt kinds)
  validation.py   GenerateRequest -> engine GenerationRequest, or InvalidRequestError naming the field
  routing_request.py SetRoutingPolicyRequest -> the routing.* mapping the engine switches to
  to_proto.py     engine dataclasses -> protobuf replies
  state.py        LOADING / SERVING / DRAINING / FAILED, mirrored into grpc.health.v1
  service.py      the GenerationService servicer (status mapping, limits, cancellation)
  generation_call.py one Generate / GenerateStream call, from admission to its last message
  active_calls.py the concurrency limits (in all, per connection), stalled readers, what draining waits for
  auth.py         bearer-token interceptor
  tls.py          start-up check of the TLS certificate and key (names a bad, mismatched or swapped file)
  metrics.py      Prometheus metrics and their HTTP endpoint
  listening.py    the listening TCP socket of the metrics and HTTP ports (SO_REUSEADDR, IPv6)
  busy_log.py     while busy, one log line per server.log_interval_s (tok/s, queue, KV use, balancedness)
  app.py          builds the grpc.aio server, serves, drains on SIGTERM/SIGINT
"""
