"""Mosquitto configuration shipped with fedbus (the files beside this module)."""

from pathlib import Path

__all__ = ["CONFIG_DIR"]

CONFIG_DIR = Path(__file__).resolve().parent
