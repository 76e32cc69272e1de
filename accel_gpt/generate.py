"""`python -m accel_gpt.generate`: the sampling command of earlier releases, now `python -m accel_gpt.sample` (the
same options); kept for one more release, with a one-line notice.
"""

import sys

if __name__ == "__main__":
    from accel_gpt import sample
    from accel_gpt.cli import run_command

    sys.stderr.write("accel_gpt: note: python -m accel_gpt.generate is now python -m accel_gpt.sample (same options)\n")
    run_command(sample.main)
else:
    # Imported (`import accel_gpt.generate`), this module would take the place of the package's `generate` function,
    # which the notebook API documents: the import hands that function back instead.
    from accel_gpt.inference import generate

    sys.modules[__name__] = generate
