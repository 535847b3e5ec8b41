"""`epserve-load`: concurrent streaming load, cancellation storms and slow readers against a
server, with checks that every stream got exactly what it asked for, the server is idle again
and its memory is back to baseline. docs/RELIABILITY.md records the numbers it measured.

Module guide:
  workload.py   LoadSpec -> seeded stream plans -> one run of N concurrent streams (RunResult)
  session.py    identical runs back to back + the checks after each (idle, accounting, memory)
  memory.py     RSS of the server and its worker ranks from /proc; the baseline rule
  report.py     percentiles, tokens/s, text and JSON reports
  spawn.py      start `python -m server` on a free port when no --target is given
  procs.py      one run from N client processes (--procs), released together
  in_process.py the same prompts on the engine alone, in this process (--compare-in-process)
  traffic.py    open-loop traffic (Poisson arrivals, prompts from a file) to the gRPC or HTTP front end
  sse_client.py a lean HTTP/1.1 client for one streaming POST of server-sent events
  latency.py    TTFT / TPOT / ITL percentiles and the HTTP-vs-gRPC table
  traffic_cli.py `--front-end grpc|http|both`: the traffic mode of the CLI
  cli.py        the `epserve-load` console entry (main)
"""
