"""cascade-bus-mqtt: the MQTT transport (``mqtt://``, ``mqtts://``) for cascade-bus, on aiomqtt."""

from ._options import MqttOptions
from ._transport import RESERVED_PREFIX, MqttTransport

__all__ = ["RESERVED_PREFIX", "MqttOptions", "MqttTransport"]
