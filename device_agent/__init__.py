"""edgepack device agent: runs bundles on the device. Never imports TensorFlow or
the packager, and stays importable on Python 3.10."""

__version__ = "0.1.0"


def load_bundle(*args, **kwargs):
    """Load a bundle for in-process inference (see device_agent.model.load_bundle)."""
    from device_agent.model import load_bundle as _load

    return _load(*args, **kwargs)
