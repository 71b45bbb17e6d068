"""Data for DualToken-MLLM: the procedural shapes world, real-format loaders, mixtures (recipes), safe image I/O
and atomic writes (the lowest layer: it imports no other package of the project)."""
