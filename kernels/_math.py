"""Per-point math shared by several Triton kernels (one copy of each formula)."""

import triton
import triton.language as tl


@triton.jit
def cofactors3(m00, m01, m02, m10, m11, m12, m20, m21, m22):
    """Cofactors ``c_ij`` of the 3x3 matrix ``m`` (row-major) and its determinant (expanded along row 0).
    The adjugate is the transpose: ``inverse = c^T / det``."""
    c00 = m11 * m22 - m12 * m21
    c01 = m12 * m20 - m10 * m22
    c02 = m10 * m21 - m11 * m20
    c10 = m02 * m21 - m01 * m22
    c11 = m00 * m22 - m02 * m20
    c12 = m01 * m20 - m00 * m21
    c20 = m01 * m12 - m02 * m11
    c21 = m02 * m10 - m00 * m12
    c22 = m00 * m11 - m01 * m10
    det = m00 * c00 + m01 * c01 + m02 * c02
    return c00, c01, c02, c10, c11, c12, c20, c21, c22, det
