"""Stage two's read path, one wing (imports nothing here: name the module you need).

- ``open.py``: open a source (a Zarr cache folder or a WebDataset export) and build one split's
  dataset of selected videos;
- ``zarr_split.py``: a Zarr cache's split (what a head reads, checked; videos selected; items);
- ``wds_split.py``: a WebDataset export's split, streamed (the same items);
- ``loader.py``: stored bytes to the device, converted there (epoch order, batches);
- ``batch.py``: the plumbing both splits and the loader share (view pick, item tensors, collate).
"""
