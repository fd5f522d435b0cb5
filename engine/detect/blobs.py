"""Connected components and blob statistics on binary images (Numba runs + union-find).

The front end calls the fused kernel :func:`engine.detect._kernels.detect_frame`; the
functions here expose the same labelling and statistics for any binary image (tests,
tools, the benchmark):

* :func:`label` -- ``(labels, n)`` like ``scipy.ndimage.label`` with 8-connectivity
  (``structure=np.ones((3, 3))``), or 4-connectivity on request.
* :func:`measure` -- one row per label: area [px²], centroid [px], half-open box, perimeter
  [px] (scikit-image's 4-neighbourhood border-configuration estimator), deformation
  ``1 - 2 sqrt(pi A) / P`` (dclab's definition), inertia ellipse (full axes [px],
  orientation [rad] from +x, y down) and mean brightness [grey levels].
* :func:`to_blobs` -- finished rows to :class:`~engine.types.Blob` values (a
  :class:`BlobList`, which also carries the rows).
"""
from __future__ import annotations

import numpy as np

from ..errors import DetectError
from ..types import Blob
from . import _kernels as K

__all__ = ["label", "measure", "to_blobs", "BlobList", "FIELDS"]

FIELDS = ("area", "cx", "cy", "x0", "y0", "x1", "y1", "perimeter", "deform", "major",
          "minor", "orientation", "brightness", "parts")


def _runs_of(mask: np.ndarray) -> tuple[np.ndarray, int]:
    m = np.ascontiguousarray(mask, dtype=np.uint8) if mask.dtype != np.uint8 else mask
    cap = m.shape[0] * ((m.shape[1] + 1) // 2) + 1     # most runs a mask can have
    runs = np.empty((cap, 3), np.int64)
    n = K.mask_runs(m, runs)
    return runs, n


def _check_2d(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise DetectError(f"{what} must be a 2-D array, got shape {a.shape}")
    return a


def label(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Label the connected non-zero regions of ``mask``.

    Parameters
    ----------
    mask : ndarray (H, W)
        Binary image (any dtype; non-zero is foreground).
    connectivity : {8, 4}
        8: pixels touching by an edge or a corner are connected (the front end's choice);
        4: by an edge only.

    Returns
    -------
    labels : ndarray of int32, shape (H, W)
        0 for background, 1..n in raster order of each region's first pixel.
    n : int
        Number of regions.
    """
    mask = _check_2d(mask, "mask")
    if connectivity not in (4, 8):
        raise DetectError(f"connectivity must be 4 or 8, got {connectivity!r}")
    runs, n = _runs_of(mask != 0)
    run_label = np.empty(max(n, 1), np.int64)
    k = K.label_runs(runs, n, connectivity == 8, run_label)
    out = np.zeros(mask.shape, np.int32)
    K.paint_labels(runs, n, run_label, out, 0, 0)
    return out, int(k)


def measure(labels: np.ndarray, n: int | None = None, image: np.ndarray | None = None) -> np.ndarray:
    """Statistics of every label of a label image.

    Parameters
    ----------
    labels : ndarray of int (H, W)
        0 = background, 1..n the regions (as returned by :func:`label`).
    n : int, optional
        Number of labels (default: ``labels.max()``).
    image : ndarray of uint8 (H, W), optional
        Grey image for the mean brightness (0 without it).

    Returns
    -------
    ndarray of float64, shape (n, len(FIELDS))
        Columns named by :data:`FIELDS`; row ``i`` is label ``i + 1``.
    """
    labels = np.ascontiguousarray(_check_2d(labels, "labels"), np.int32)
    n = int(labels.max()) if n is None else int(n)
    stats = np.zeros((max(n, 1), K.NSTAT), np.float64)
    if image is not None:
        image = _check_2d(image, "image")
        if image.shape != labels.shape or image.dtype != np.uint8:
            raise DetectError(f"image must be uint8 of shape {labels.shape}, got "
                              f"{image.dtype} {image.shape}")
        img = np.ascontiguousarray(image)
    else:
        img = np.zeros((1, 1), np.uint8)
    # runs per label: runs of the label image where consecutive pixels share the label
    runs, nr, run_label = _label_image_runs(labels)
    K.accumulate_runs(runs, nr, run_label, n, img, image is not None, stats, 0)
    K.perimeter_from_labels(labels, stats, 0, K.PERIM_WEIGHTS)
    out = np.empty((n, K.NFIN), np.float64)
    K.finish_stats(stats, n, out)
    return out


def _label_image_runs(labels: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    runs = np.empty((labels.size + 1, 3), np.int64)
    run_label = np.empty(labels.size + 1, np.int64)
    nr = K.runs_by_value(labels, runs, run_label, 0, 0)
    return runs, nr, run_label


class BlobList(list):
    """A list of :class:`~engine.types.Blob` values that also carries them as one array.

    ``fin`` is the float64 array (n, len(FIELDS)) of the finished statistics rows the blobs
    were made from, in the same order, so that a consumer working on arrays (the linker)
    need not read the Blob values. Treat it as read-only: changing the list does not change
    ``fin`` (a plain list made from it, e.g. by filtering, carries no ``fin``).
    """

    __slots__ = ("fin",)


def to_blobs(fin: np.ndarray, frame_index: int) -> BlobList:
    """Finished statistics rows (``FIELDS`` columns) to :class:`Blob` values of one frame.

    The result keeps ``fin`` itself (no copy) as its ``fin``.
    """
    out = BlobList()
    out.fin = fin
    if fin.shape[0] == 0:
        return out
    fi = int(frame_index)
    rows = fin.tolist()
    make = tuple.__new__       # Blob's fields in order, without namedtuple's Python __new__
    # area and box: truncation to int, as int() does (the values are whole numbers)
    out.extend([make(Blob, (fi, r[1], r[2], int(r[0]), (int(r[3]), int(r[4]), int(r[5]),
                                                         int(r[6])),
                            r[7], r[8], r[9], r[10], r[11], r[12])) for r in rows])
    return out
