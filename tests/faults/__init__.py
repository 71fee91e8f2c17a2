"""Fault injection: every command against every class of bad input, and kill -9 with bit-identical resume."""
