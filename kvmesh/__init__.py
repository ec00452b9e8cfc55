"""kvmesh: LMCache P2P KV-cache sharing for vLLM pods on Kubernetes."""

__version__ = "0.1.0"
