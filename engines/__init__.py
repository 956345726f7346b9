"""TensorRT engine building (one engine per subgraph per tensor-parallel rank)."""
