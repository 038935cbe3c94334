"""Federated adaptation (issue 13): client partitions and the federated methods' rules. The study and its
engines (in-process stacked simulation, Flower) build on these."""
