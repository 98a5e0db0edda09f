"""fedbus: federated learning for fleets of small devices over MQTT.

This package holds what the edge agent and the coordinator both speak: topic names,
message schemas, the msgpack envelope and its limits, tensor encoding and update codecs,
the model zoo, configuration loading and the one module that talks MQTT.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
