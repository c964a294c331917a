"""Sphinx configuration.

Sphinx + numpydoc: the toolchain NumPy, SciPy and scikit-learn document with,
so users find the numpydoc docstrings rendered the way they already read them.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
sys.path.insert(0, os.path.abspath("../adapters"))

project = "onlinela"
author = "onlinela developers"
release = "0.1.0"
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
]
autosummary_generate = True
numpydoc_show_class_members = False
html_theme = "pydata_sphinx_theme"
exclude_patterns = ["_build"]
