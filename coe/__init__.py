"""coe: a Composition-of-Experts LLM serving layer on Ray Serve."""

__version__ = "0.1.0"
