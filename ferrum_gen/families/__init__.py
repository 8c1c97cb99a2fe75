"""Kernel families: each module turns a spec into the values of one template."""
