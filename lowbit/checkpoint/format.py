"""The checkpoint format's name and version, and the name of its manifest: what a save writes and a load accepts."""
FORMAT, FORMAT_VERSION, MANIFEST = "lowbit", 1, "lowbit.json"
