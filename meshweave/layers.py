"""The declared dependency order of meshweave's packages: a package may import only from itself and from
the layers below its own (tests/test_layering.py reads every import with `ast` and enforces it).

Top to bottom. Packages in one layer stand beside each other and may not import one another.
"""

LAYERS: list[tuple[str, ...]] = [
    ("__main__", "testing", "testing_equivalence"),  # `python -m meshweave`, the multi-process test harness
    ("launch",),  # CLI and process start
    ("swarm",),  # fault-tolerant pipelines: a second runtime that reuses train's optimizer and schedule
    ("train",),  # assemble and run a job: it may import everything below
    ("parallel",),  # apply parallelisms, step runners
    ("attention",),  # sequence-parallel ops and local kernels
    ("models",),  # model specs and modules
    ("checkpoint", "data"),  # beside the stack: persistence, data sources
    ("core",),  # config schema and loading, ParallelDims/mesh, Batch, CommGroup
    ("layers",),  # this list
]
