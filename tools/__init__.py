"""Tools that drive metajax's binaries from the project root; not part of the installed package.

`tools.reproduce`: the reproduction suite of docs/RESULTS.md (`python -m tools.reproduce`).
"""
