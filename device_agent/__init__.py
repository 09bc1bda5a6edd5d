"""edgepack device agent: runs bundles on the device. Never imports TensorFlow or
the packager, and stays importable on Python 3.10."""

__version__ = "0.1.0"
