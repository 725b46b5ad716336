"""A real gRPC server implementing bali_zero.rag.v1 with deterministic, configurable behaviour."""
