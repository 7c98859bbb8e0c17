"""h5ad -> validated, vocabulary-aligned Zarr v3 / WebDataset stores -> streaming loaders."""
