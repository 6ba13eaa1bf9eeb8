"""The prediction folder and what reads it: its schema (folder.py), voting, pictures (render.py),
evaluate and the HTML report."""
