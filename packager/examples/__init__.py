"""Small, real example models used by `edgepack demo`, the examples/ folder and the tests."""
