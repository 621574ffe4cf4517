"""Thin Flower app components that point at the installed fedrwe package."""
