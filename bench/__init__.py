"""dpmem benchmark package: DP-SGD methods (bench.dp), memory measurement (bench.memory) and the pytest cases."""
