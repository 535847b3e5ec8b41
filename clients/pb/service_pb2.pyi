from . import abort_pb2 as _abort_pb2
from . import generation_pb2 as _generation_pb2
from . import info_pb2 as _info_pb2
from . import routing_pb2 as _routing_pb2
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor
