"""Reading and writing other libraries' quantized formats."""
