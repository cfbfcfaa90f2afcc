"""Sphinx configuration for the p2p-relay documentation."""

project = "p2p-relay"
author = "p2p-relay developers"
extensions: list[str] = []
master_doc = "index"
exclude_patterns = ["_build"]
html_theme = "alabaster"
