"""`accel_gpt.tokens` of earlier releases, now `accel_gpt.data.tokens`; importing it says so (compat.py)."""

from accel_gpt.compat import moved_module

moved_module(__spec__.name)  # __name__ is __main__ under `python -m`
