"""Dataset scanning into a manifest, Great Expectations suites and validation reports."""
