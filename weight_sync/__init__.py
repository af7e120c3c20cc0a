"""Checkpoint loaders (safetensors, state dict, distributed, CUDA IPC, Ray objects) and trainer-side senders."""
