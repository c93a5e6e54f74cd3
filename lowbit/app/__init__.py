"""The application side of lowbit (what the `lowbit` command runs): the bundled models, the method names of the
command line, comparisons, reports and plots. The library API (quantize, layers, checkpoints, configs) does not
depend on it."""
