"""Development kit: what the tests, the demo, the examples and the benchmarks build and start locally.

Not part of the slmbatch package (the wheel ships only ``slmbatch/``):

- :mod:`devkit.toymodels` - tiny random models and the MiniLM classifiers, built on this machine;
- :mod:`devkit.localserver` - vLLM's OpenAI-compatible server as a local frontier;
- :mod:`devkit.classifier_server` - a stand-in frontier that answers from a local sequence classifier.

``make install`` puts the repository root on the virtualenv's path, so these
import from anywhere in a checkout (tests, examples, Ray workers).
"""
