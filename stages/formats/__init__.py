"""Tables, their columns and dtypes; OpenImages files <-> tables; atomic I/O. The one place that knows formats."""
