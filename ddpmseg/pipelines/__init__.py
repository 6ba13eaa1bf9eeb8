"""Whole commands as library functions: extract (images -> store), predict (run + store or images
-> prediction folder), suggest, sweep, verify and demo."""
