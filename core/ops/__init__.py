"""The primitive ops. Importing this package fills ``gradmesh.core.registry.REGISTRY``.

Vocabulary, in every file here: ``xp`` is the array module (numpy or cupy); in a vjp, ``g``
is the incoming gradient, ``out`` the forward result, and the op's inputs follow under
their own names. Forward functions take and return arrays; vjps take and return Tensors,
built with differentiable ops so that higher-order gradients work.
"""

from . import activation, conv, elementwise, linalg, loss, nn, norm, reduce, shape  # noqa: F401
