"""The fleet protocol: the contract between devices (device_agent) and the fleet side (fleet).

Topic layout (topics), the desired record with its typed transfers (desired), the status, event,
telemetry and rollout records (records), the broker connection settings (broker) and the MQTT
client wrapper (mqtt). Standard library, edgebundle and paho-mqtt only: agents import it, so it
stays light and runs on Python 3.10."""
