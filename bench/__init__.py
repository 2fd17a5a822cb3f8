"""The benchmark: ``make bench`` / ``python -m bench`` from the repository root (not part of the installed package;
see README.md)."""
