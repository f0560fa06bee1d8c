"""meshweave: data, tensor, pipeline and sequence parallelism for PyTorch from one YAML file."""

__version__ = "0.1.0"
