"""epserve: a gRPC server for Mixture-of-Experts models with expert parallelism.

Module guide (this folder; each sub-package has its own guide in its __init__):
  __main__.py, cli.py  `python -m server` / `epserve`: the Hydra entry point (Hydra lives only here)
  command_line.py    what the entry point adds around Hydra's command line (one-paragraph errors, exit 2)
  command_help.py    --help (groups, options, every key and its meaning) and --version
  startup_checks.py  every check that needs no device, run before anything listens or spawns
  config.py          frozen, validated AppConfig and its sections (ConfigError names the key)
  routing_setup.py   routing.* -> a policy checked against the served model's shape
  eplb_setup.py      parallel.* EPLB keys -> settings checked against the model
  dispatch_setup.py  parallel.dispatch* -> the EP dispatcher's settings, checked before ranks spawn
  dry_run.py         dry_run=true: every start-up check, no weights, no port
  launch.py          start-up after the config: open the port, start the engine, serve, drain
  registry.py        the one Registry type behind every extensible name
Sub-packages, in dependency order (tests/layout/test_import_layers.py checks it):
  kernels/ <- layers/ <- moe/ <- model/ <- engine/ <- rpc/; bench/, loadtest/ and eval/ are tools on top.
"""
