"""Units of work: plain functions over tensors (math does no I/O), each with a
thin Prefect wrapper where a flow needs one. Imports `storage`, never `flows`."""
