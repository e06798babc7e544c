"""What a step is measured with: memory (tensor tracker, NVML, allocator, RSS), time (the timed rounds and what
else the machine was doing), and the neutral channel through which DP methods announce phases and buffers to them."""
