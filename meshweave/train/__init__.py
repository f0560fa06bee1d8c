"""Assemble and run a job from a Config: whole-config validation, build, the trainer loop, metrics.

The top of the library: it may import every package below it.
"""
