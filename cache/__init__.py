"""Floor 1: the feature store (numpy, zarr, webdataset; never torch)."""
