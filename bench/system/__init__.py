"""The machine a run happens on: which devices this process can measure on (strict device strings), and the
facts recorded with every result (GPUs, driver, CUDA, versions, CPU, RAM)."""
