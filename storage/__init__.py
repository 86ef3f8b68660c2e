"""Where data lives: the Zarr catalogue, model sources, safetensors I/O.

Knows nothing of Prefect or Dask; imports nothing from `tasks` or `flows`.
"""
