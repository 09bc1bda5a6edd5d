"""Over-the-air model updates: desired state over MQTT, verified transfer, staged load,
atomic switch, probation and automatic rollback. See updater.py for the state diagram."""
