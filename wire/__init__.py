"""gradmesh.wire: the Python side of the contract in ``protos/gradmesh/v1``.

What both ends of a connection share, for the SDK (``gradmesh.client``) and the services
(``gradmesh.server``) alike, which never import each other:

* :mod:`.stream`: large messages as a header and chunks (``Assembler``, ``BufferPool``);
* :mod:`.frames`: the frame codec, protobuf's bytes with one copy of tensor data per side;
* :mod:`.sharedmem`: the request side of same-host shared memory;
* :mod:`.channel`: channels, TLS and call metadata; :mod:`.errors`: typed RPC errors;
* one client module per service: :mod:`.worker` (with the transport policy),
  :mod:`.shard`, :mod:`.coordinator`.

The ``Tensor`` value codec itself is the engine's (``gradmesh.core.serialize``): graphs
carry tensors as constants. This package builds only on ``gradmesh.core``,
``gradmesh.v1`` and third-party packages (pyproject.toml's import contracts).
"""
