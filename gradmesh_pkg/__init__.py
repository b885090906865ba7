"""gradmesh: distributed gradient computation as a service.

``gradmesh.core`` is the autograd engine, ``gradmesh.client`` the SDK, ``gradmesh.server``
the services and ``gradmesh.v1`` the generated gRPC contract.
"""

__version__ = "0.1.0"
