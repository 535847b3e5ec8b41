"""epserve serving process: Hydra entry point, gRPC service, engine and model."""
