"""Speed benchmarks: stage-1 training steps, encoding and decoding, stage-2 training and sampling.

Run ``python -m benchmarks.run --help``; speed is measured here, never in the test suite.
"""
