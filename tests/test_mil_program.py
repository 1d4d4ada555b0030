"""The MIL interpreter's programs: routing as the experts graph needs, and refusing ops it does not know."""

from __future__ import annotations

import numpy as np
import pytest
from coreml_programs import saved_program

from siliconvert.errors import ArtifactError


def test_interpreter_routes_as_the_experts_graph_needs(tmp_path):
    """topk (after coremltools' int16 cast of its indices), lower index first among equal values, and one_hot
    on any axis."""
    from coremltools.converters.mil import Builder as mb

    def body(x):
        values, ids = mb.topk(x=x, k=2, axis=-1)
        hot = mb.one_hot(indices=ids, one_hot_vector_size=4, axis=1, on_value=np.float16(0.5), off_value=np.float16(0))
        return values, mb.reduce_sum(x=hot, axes=[2])

    program = saved_program(tmp_path, body, (3, 4))
    x = np.array([[0.1, 0.7, 0.7, 0.2], [0.25, 0.25, 0.25, 0.25], [0.4, 0.1, 0.3, 0.2]], np.float16)
    values, weights = program.run("main", {"x": x}, {}).values()
    np.testing.assert_array_equal(values, np.array([[0.7, 0.7], [0.25, 0.25], [0.4, 0.3]], np.float16))
    np.testing.assert_array_equal(weights, np.array([[0, 1, 1, 0], [1, 1, 0, 0], [1, 0, 1, 0]]) * np.float16(0.5))


def test_interpreter_refuses_ops_it_does_not_know(tmp_path):
    from coremltools.converters.mil import Builder as mb

    with pytest.raises(ArtifactError, match=r"'sin'.*not implemented"):
        saved_program(tmp_path, lambda x: mb.sin(x=x), (4,))
