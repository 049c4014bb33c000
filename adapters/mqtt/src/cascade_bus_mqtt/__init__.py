"""cascade-bus-mqtt: the MQTT transport (``mqtt://``, ``mqtts://``) for cascade-bus, on aiomqtt."""

from ._options import MqttOptions
from ._transport import RESERVED_PREFIX, RETAIN_PROPERTY, MqttTransport

__all__ = ["RESERVED_PREFIX", "RETAIN_PROPERTY", "MqttOptions", "MqttTransport"]
