"""bali-zero-bridge: a gRPC-backed Server-Sent Events bridge for a streaming RAG service."""
