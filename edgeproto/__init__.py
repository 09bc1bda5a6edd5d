"""The fleet protocol: the contract between devices (device_agent) and the fleet side (fleet).

Topic layout (topics), what records name (bundleref: BundleRef, typed transfers, strict reading),
the desired record (desired) and profile job (jobs), the status and telemetry writers (documents)
and their lenient readers with the event records (records), the broker connection settings (broker)
and the MQTT client wrapper (mqtt). Standard library, edgebundle and paho-mqtt only: agents import
it, so it stays light and runs on Python 3.10."""
