"""Thin HTTP routes of the queen: parse, call one function, return a contract model."""
