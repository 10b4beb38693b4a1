"""The reference reproducible MNIST pipeline: fetch → preprocess → train → report."""

import os

# TensorFlow's C++ start-up lines (oneDNN notices, absl warnings, graph-version notes) say nothing a
# user can act on, and its real failures reach Python as exceptions. Every entry point imports this
# package before TensorFlow, which reads the setting when it loads; a user can still set it lower.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
