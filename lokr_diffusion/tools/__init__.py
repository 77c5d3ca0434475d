"""The `lokr-diffusion` toolbox: inspect, plan, merge, convert and extract adapters.

Each tool is a small module with a library function that returns plain data (dicts of
numbers and strings, so the CLI can print it or dump it as JSON) and does the work through
the package's own math, naming and file code. The CLI commands in `lokr_diffusion.cli` are
thin wrappers around these functions.
"""
