"""Memory measurement, one module per source of truth: nvml (device), cuda (allocator), tensors (exact live
tensor bytes by category, any device), process (RSS), and record (the result record)."""
