"""IPython extension."""
