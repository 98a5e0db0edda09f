"""Mosquitto configuration shipped with fedbus (the files beside this module).

``mosquitto.conf`` is the global broker policy without anything instance-specific (no
listener, no file paths); ``listener.conf`` holds the settings Mosquitto 2.0 applies per
listener, to repeat after every ``listener`` line; ``tls.conf`` and ``mtls.conf`` follow
them on a TLS listener (password login) and a mutual-TLS listener (client certificate, its
common name as the username); ``fedbus.acl`` is the access control list for the default
topic prefix.
"""

from pathlib import Path

__all__ = [
    "ACL_FILE",
    "CONFIG_DIR",
    "LISTENER_POLICY_FILE",
    "MTLS_POLICY_FILE",
    "POLICY_FILE",
    "TLS_POLICY_FILE",
]

CONFIG_DIR = Path(__file__).resolve().parent
POLICY_FILE = CONFIG_DIR / "mosquitto.conf"
LISTENER_POLICY_FILE = CONFIG_DIR / "listener.conf"
TLS_POLICY_FILE = CONFIG_DIR / "tls.conf"
MTLS_POLICY_FILE = CONFIG_DIR / "mtls.conf"
ACL_FILE = CONFIG_DIR / "fedbus.acl"
