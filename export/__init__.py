"""Checkpoint -> BF16 weights -> traceable PyTorch pieces -> ONNX subgraphs.

Data flows one way: `checkpoint` reads and dequantizes the published FP8 files, `sharding`
cuts one layer into one tensor-parallel rank's slice, `model` computes with those weights.
"""
