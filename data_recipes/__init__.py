"""Data for DualToken-MLLM: the procedural shapes world, real-format loaders, mixtures (recipes), safe image I/O."""
