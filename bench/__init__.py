"""Benchmarks and prototypes: measuring tools that product code never imports."""
