"""Benchmarks (`make bench`; `python -m bench.<name>`): each prints a table and writes JSON under
bench/results/. flyray's console applies: library chatter off, the full log in a file."""

from flyray import console

console.configure()
