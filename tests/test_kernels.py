"""User kernel files and the explicit kernels' documented properties."""

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from pipeline import VolfilterError, kernels


def test_text_kernel_blocks_index_axis_0(tmp_path):
    path = tmp_path / "k.txt"
    path.write_text("# a 3x3x1 kernel in three blocks\n1\n2\n3\n\n4\n5\n6\n\n7\n8\n9\n")
    k = kernels.load_kernel_file(path)
    assert k.shape == (3, 3, 1)
    assert_array_equal(k[:, :, 0], [[1, 2, 3], [4, 5, 6], [7, 8, 9]])


def test_single_text_block_is_one_voxel_thick(tmp_path):
    path = tmp_path / "k.txt"
    path.write_text("0 -1 0\n-1 5 -1\n0 -1 0\n")
    assert kernels.load_kernel_file(path).shape == (1, 3, 3)


def test_npy_kernel(tmp_path):
    np.save(tmp_path / "k.npy", np.ones((3, 5, 1)))
    assert kernels.load_kernel_file(tmp_path / "k.npy").shape == (3, 5, 1)


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("1 2\n3 4\n", "odd"),
        ("1 a 3\n", "not a numeric"),
        ("1 2 3\n4 5\n6 7 8\n", "ragged"),
        ("", "no numbers"),
        ("1 nan 1\n", "NaN"),
    ],
)
def test_bad_text_kernels(tmp_path, text, fragment):
    path = tmp_path / "k.txt"
    path.write_text(text)
    with pytest.raises(VolfilterError, match=fragment):
        kernels.load_kernel_file(path)


def test_bad_npy_kernels(tmp_path):
    np.save(tmp_path / "k2.npy", np.ones((3, 3)))
    with pytest.raises(VolfilterError, match="3-D"):
        kernels.load_kernel_file(tmp_path / "k2.npy")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(VolfilterError, match="not a numeric"):
        kernels.load_kernel_file(tmp_path / "junk.npy")
    with pytest.raises(VolfilterError, match="does not exist"):
        kernels.load_kernel_file(tmp_path / "missing.npy")


def test_classic_2d_kernels_are_the_central_slices():
    # The 3-D sharpen restricted to one plane has the classic 2-D cross pattern.
    assert_array_equal(kernels.sharpen(1.0)[1][[0, 1, 1, 2], [1, 0, 2, 1]], -1)
    # The 3-D emboss restricted to the k=1 plane is the classic 2-D emboss.
    assert_array_equal(kernels.emboss()[:, :, 1], [[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
