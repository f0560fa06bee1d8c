"""The Llama-style decoder kind: config (torch-free), module, and its spec (TP plan, FSDP units, split, FLOPs)."""
