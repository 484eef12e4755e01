"""The index: an offline build (index.build), a folder layout (index.layout), loading and search
(index.store), and the manifest that ties an index to its model and data (index.manifest)."""

from index.layout import IndexLayout

__all__ = ["IndexLayout"]
