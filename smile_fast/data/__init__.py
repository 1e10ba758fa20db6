"""Datasets as (path, label) file lists, subset protocols, the demo generator and the loaders."""
