"""Load testing tools."""
